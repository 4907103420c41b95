"""The annotator on real photos: shape groups, batch independence, labels vs predicted classes."""

from dataclasses import replace

import camlabel.workers.annotator as annotator_module
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from camlabel.schemas.config import METHOD_DEFAULTS, SCALES, AnnotateSettings
from camlabel.workers.annotator import Annotator, mean_map, resample_maps, shape_groups, shape_key, tightened
from camlabel.workers.boxes import PseudoLabel, pseudo_labels, working_maps
from camlabel.workers.heatmaps import compute_heatmaps, normalise
from camlabel.workers.models import load_model
from camlabel.workers.preprocess import prepare_batch
from camlabel.workers.regions import CROP_SIZE
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data
from torchvision.ops import box_iou


def photo(height: int, width: int) -> torch.Tensor:
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float()
    return F.interpolate(cat, size=(height, width), mode="bilinear", antialias=True)[0].round().byte()


def test_an_images_labels_do_not_depend_on_its_batch_mates():
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=96))
    a, b, portrait = photo(120, 160), photo(120, 150), photo(200, 120)
    assert list(shape_groups([a, b, portrait], 96).values()) == [[0, 1], [2]]
    together = annotator([a, b, portrait], [[281], [281], [281]])
    for i, image in enumerate([a, b, portrait]):
        alone = annotator([image], [[281]])
        assert [p.rle for p in alone.labels[0]] == [p.rle for p in together.labels[i]]
        torch.testing.assert_close(alone.maps[0], together.maps[i], atol=1e-4, rtol=1e-4)


def test_labels_choose_the_classes_and_predictions_fill_in_without_them():
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=128, scales=(1.0,), flip=False))
    cat = photo(240, 320)
    labelled = annotator([cat], [[281, 999]])
    assert {p.class_index for p in labelled.labels[0]} <= {281, 999}
    assert labelled.classes[0].tolist() == [281, 999]
    predicted = annotator([cat])
    assert predicted.top_classes[0, 0].item() in {281, 282, 285}
    assert predicted.labels[0], "the top predicted class of a clear cat photo gets a box"
    assert predicted.labels[0][0].class_index in {281, 282, 283, 284, 285}  # named by its crop: a cat
    box = predicted.labels[0][0].bbox
    assert box[2] * box[3] > 0.05 * 240 * 320  # the cat fills much of the photo


def test_a_class_listed_twice_is_mapped_once():
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=96, scales=(1.0,), flip=False))
    cat = photo(120, 160)
    once, twice = annotator([cat], [[281]]), annotator([cat], [[281, 281]])
    assert twice.classes[0].tolist() == [281]
    assert once.labels[0] and [p.rle for p in twice.labels[0]] == [p.rle for p in once.labels[0]]
    assert annotator([cat], [[281, 999, 281]]).classes[0].tolist() == [281, 999]  # in the order first listed


@pytest.mark.parametrize("scales", [(1.0, 1.5), (1.5, 2.0)])  # with and without a pass at input_size
def test_labelled_maps_spread_with_the_features_of_the_unmirrored_pass_at_input_size(scales, monkeypatch):
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=96, scales=scales,
                                                                     precision="float32"))
    cat = photo(120, 200)
    seen, sets, cut_with = [], [], []
    monkeypatch.setattr(annotator_module, "working_maps",
                        lambda maps, *args, features=None, **kw: seen.append(features) or sets.append(
                            (maps.shape[1], kw.get("set_size"))) or working_maps(maps, *args, **kw, features=features))
    # the same features tell two objects of a class from one object's parts (`BoxRule.alike`)
    monkeypatch.setattr(annotator_module, "pseudo_labels",
                        lambda *args: cut_with.append(args[-1]) or pseudo_labels(*args))
    annotator([cat], [[281, 283]])
    assert all(j is f for j, f in zip(cut_with, seen, strict=True))
    assert sets[0] == (4, 2)  # two classes at the fine and at the coarse scales: each set's two compete
    batch, _ = prepare_batch([cat], 96, "cpu", pad_to=(128, 192))  # its shape group's padded input
    with torch.no_grad():
        expected = annotator.loaded.model.features[:14](batch)  # features.13's output, stride 16
    assert seen[0].shape == (1, 96, 8, 12)
    torch.testing.assert_close(seen[0], expected)
    seen.clear()
    annotator([cat])  # without labels the look's proposals do not spread (a wrong one's map would swell);
    assert seen[0] is None  # the classes it names then do, as labelled ones
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], expected)
    assert all(j is f for j, f in zip(cut_with[1:], seen, strict=True))  # the look's, then the named's


def test_without_labels_the_looks_pass_serves_the_named_classes_at_input_size():
    loaded = load_model(device="cpu")
    cat = photo(120, 160)
    rows, cols = shape_key(120, 160, 96)
    shapes = []
    handle = loaded.model.register_forward_pre_hook(lambda _m, inputs: shapes.append(tuple(inputs[0].shape)))
    try:
        Annotator(loaded, AnnotateSettings(input_size=96, scales=(1.0, 1.5)))([cat])
    finally:
        handle.remove()
    # at input_size: the look's one pass (its proposals and their maps; it keeps its graph down to the detail
    # layer, so the named classes' unmirrored CAM and detail map come from it too), and the named classes'
    # mirrored pass (CAM, with the detail map's LayerCAM)
    at_input_size = (1, 3, rows * annotator_module.GROUP_STEP, cols * annotator_module.GROUP_STEP)
    assert shapes.count(at_input_size) == 2
    shapes.clear()
    handle = loaded.model.register_forward_pre_hook(lambda _m, inputs: shapes.append(tuple(inputs[0].shape)))
    try:
        Annotator(loaded, AnnotateSettings(input_size=96, scales=(1.0, 1.5)))([cat], [[281]])
    finally:
        handle.remove()
    assert shapes.count(at_input_size) == 2  # with labels, one pass and its mirror give CAM and the detail map


def test_maps_of_another_scale_are_sampled_at_the_same_image_points():
    # maps of a padded batch whose value is the image's own x coordinate (0..1) at each cell centre;
    # bilinear sampling of a linear ramp is exact, so every interior target cell must read its own x
    valid = torch.tensor([[96, 160], [96, 128]])
    input_size, cells = (96, 192), (12, 24)  # stride 8
    xs = (torch.arange(cells[1]) + 0.5) * (input_size[1] / cells[1])
    ramp = torch.stack([(xs / w).expand(cells[0], -1) for w in valid[:, 1].tolist()])[:, None]
    to_valid = torch.tensor([[48, 80], [48, 64]])  # the same images at half the size, other padding
    to_input, grid = (64, 96), (16, 24)  # stride 4
    out = resample_maps(ramp, valid, input_size, grid, to_valid, to_input)
    centres = (torch.arange(grid[1]) + 0.5) * (to_input[1] / grid[1])
    for i, w in enumerate(to_valid[:, 1].tolist()):
        inside = (centres > 8) & (centres < w - 8)  # away from the image's edges, where border clamps
        torch.testing.assert_close(out[i, 0, 5][inside], centres[inside] / w, atol=1e-5, rtol=0)


def test_every_scale_sees_the_cat_in_the_same_place():
    loaded = load_model(device="cpu")
    cat = photo(180, 240)
    maps = []
    for scales in ((1.0,), (2.0,), (1.5,)):
        settings = AnnotateSettings(input_size=96, scales=scales, flip=False, refine=False)
        result = Annotator(loaded, settings)([cat], [[281]])
        assert result.maps[0].shape == (1, 24, 32)  # always the working grid of --input-size
        maps.append(result.maps[0][0].flatten())
    for other in maps[1:]:  # the same cat at twice the size: the maps agree where it is
        assert torch.corrcoef(torch.stack([maps[0], other]))[0, 1] > 0.6


def test_every_scale_but_the_largest_is_averaged_with_its_mirror():
    loaded = load_model(device="cpu")
    cat, targets = photo(96, 140), torch.tensor([[281]])
    batch, valid = prepare_batch([cat], 64, "cpu")

    def per_scale(scales, flip):
        settings = AnnotateSettings(input_size=64, scales=scales, flip=flip, refine=False)
        return Annotator(loaded, settings).maps_per_scale([cat], batch, valid, targets)[1]

    mirrored, plain = per_scale((1.0, 2.0), True), per_scale((1.0, 2.0), False)
    torch.testing.assert_close(mirrored[2.0], plain[2.0])  # the largest: as computed, unmirrored
    assert (mirrored[1.0] - plain[1.0]).abs().max() > 0.02  # the cat is not symmetric: the mirror shows
    torch.testing.assert_close(mirrored[1.0], per_scale((1.0,), True)[1.0])  # one scale alone is mirrored


def test_the_fine_extent_holds_layercam_of_the_affinity_layer_and_the_coarse_does_not():
    loaded = load_model(device="cpu")
    cat, targets = photo(96, 140), torch.tensor([[281]])
    batch, valid = prepare_batch([cat], 64, "cpu")
    settings = AnnotateSettings(input_size=64, scales=(1.0, 2.0), flip=False, refine=False, precision="float32")
    annotator = Annotator(loaded, settings)
    fine, coarse = annotator._heatmaps_multiscale([cat], batch, valid, targets)
    _, per_scale, detail = annotator.maps_per_scale([cat], batch, valid, targets)
    torch.testing.assert_close(coarse, mean_map([per_scale[1.0]]))
    torch.testing.assert_close(fine.maps, mean_map([per_scale[2.0], detail]))
    layercam = compute_heatmaps(loaded.model, batch, target_layer=loaded.affinity_layer, method="layercam",
                                targets=targets).maps
    cam = compute_heatmaps(loaded.model, batch, target_layer=loaded.target_layer, targets=targets).maps
    assert layercam.shape[-1] == 2 * cam.shape[-1]  # twice CAM's resolution
    torch.testing.assert_close(detail, normalise(resample_maps(layercam, valid, batch.shape[-2:],
                                                               per_scale[1.0].shape[-2:], valid, batch.shape[-2:])))
    for other in (replace(settings, method="gradcam"), replace(settings, scales=(1.5, 2.0))):
        assert Annotator(loaded, other).maps_per_scale([cat], batch, valid, targets)[2] is None


def test_the_detail_map_finds_a_cat_on_a_grey_wall():
    canvas = torch.full((3, 384, 576), 128, dtype=torch.uint8)
    canvas[:, 96:288, 192:448] = photo(192, 256)  # 22% of the image
    batch, valid = prepare_batch([canvas], 384, "cpu")
    settings = AnnotateSettings(input_size=384, flip=False, refine=False, precision="float32")
    annotator = Annotator(load_model(device="cpu"), settings)
    detail = annotator.maps_per_scale([canvas], batch, valid, torch.tensor([[281]]))[2][0, 0]
    assert detail.shape == (96, 144)  # the working grid
    assert detail[24:72, 48:112].sum() > 2 * 0.22 * detail.sum()  # over twice its share of the evidence on the cat


def test_predicted_classes_come_from_the_input_size_whatever_the_scales():
    loaded = load_model(device="cpu")
    cat = photo(240, 320)
    at_input = Annotator(loaded, AnnotateSettings(input_size=128, scales=(1.0,), flip=False, refine=False))([cat])
    larger = Annotator(loaded, AnnotateSettings(input_size=128, scales=(2.0, 3.0), flip=False, refine=False))([cat])
    assert torch.equal(at_input.top_classes, larger.top_classes)
    torch.testing.assert_close(at_input.top_scores, larger.top_scores)
    assert torch.equal(at_input.classes[:, :1], larger.classes[:, :1])  # the top class is always mapped


def test_settings_left_unset_take_the_methods_defaults():
    loaded = load_model(device="cpu")
    cam = Annotator(loaded, AnnotateSettings())
    assert cam.settings.scales == SCALES and (cam.rule.threshold, cam.rule.mask_threshold) == (0.45, 0.5)
    eigen = Annotator(loaded, AnnotateSettings(method="eigencam"))
    expected = METHOD_DEFAULTS["eigencam"]
    assert eigen.settings.scales == expected["scales"]
    assert (eigen.rule.threshold, eigen.rule.mask_threshold) == (expected["threshold"], expected["mask_threshold"])
    given = Annotator(loaded, AnnotateSettings(method="eigencam", threshold=0.3, scales=(1.0,)))
    assert given.settings.scales == (1.0,) and (given.rule.threshold, given.rule.mask_threshold) == (0.3, 0.3)
    switched = Annotator(loaded, replace(AnnotateSettings(), method="eigencam"))  # the new method's defaults
    assert switched.settings.scales == expected["scales"] and switched.rule.threshold == expected["threshold"]
    for method in ("scorecam", "occlusion"):  # one forward pass per channel or patch: one scale, no mirror
        perturbation = Annotator(loaded, AnnotateSettings(method=method))
        assert perturbation.settings.scales == (1.0,) and perturbation.settings.flip is False
    assert cam.settings.flip is True
    paper = Annotator(loaded, AnnotateSettings(method="eigencam", rule="paper"))
    assert (paper.rule.threshold, paper.rule.mask_threshold) == (0.2, 0.2)  # the paper's rule is the paper's


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_bfloat16_runs_the_model_in_bfloat16_and_finds_the_same_cat(method):
    loaded = load_model(device="cpu")
    seen = []
    layer = dict(loaded.model.named_modules())[loaded.target_layer]
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    cat = photo(240, 320)
    try:
        results = {precision: Annotator(loaded, AnnotateSettings(method=method, input_size=160, precision=precision))(
            [cat], [[281]]) for precision in ("float32", "bfloat16")}
    finally:
        handle.remove()
    assert set(seen) == {torch.float32, torch.bfloat16}  # autocast was on for bfloat16 only
    full, half = (results[p].maps[0][0] for p in ("float32", "bfloat16"))
    assert half.dtype == torch.float32  # maps and what follows stay float32
    assert torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1] > 0.95
    a, b = (results[p].labels[0][0].bbox for p in ("float32", "bfloat16"))
    overlap = [max(a[0], b[0]), max(a[1], b[1]), min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])]
    inter = max(0, overlap[2] - overlap[0]) * max(0, overlap[3] - overlap[1])
    assert inter / (a[2] * a[3] + b[2] * b[3] - inter) > 0.8


def test_the_models_passes_run_without_cudnn_at_the_precision_asked_and_leave_cudnn_as_they_found_it():
    """cuDNN chooses kernels anew for each input shape (15-34 s a batch on an H200); every pass goes without.
    The maps' passes run under bfloat16 autocast when that precision is asked, the regions' crops in float32."""
    loaded = load_model(device="cpu")
    seen = []
    handle = loaded.model.register_forward_pre_hook(lambda _m, inputs: seen.append(
        (tuple(inputs[0].shape[-2:]), torch.backends.cudnn.enabled, torch.is_autocast_enabled("cpu"))))
    try:
        Annotator(loaded, AnnotateSettings(input_size=96, precision="bfloat16"))([photo(120, 160)], None)
    finally:
        handle.remove()
    assert not any(cudnn for _, cudnn, _ in seen)  # the look, each scale and mirror, the crops
    crops = [autocast for shape, _, autocast in seen if shape == (CROP_SIZE, CROP_SIZE)]
    maps = [autocast for shape, _, autocast in seen if shape != (CROP_SIZE, CROP_SIZE)]
    assert crops and not any(crops) and maps and all(maps)
    assert torch.backends.cudnn.enabled


def test_an_unknown_precision_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="^precision: "):
        AnnotateSettings(precision="float16")


@pytest.mark.parametrize(("flags", "native"), [("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                               ("fpu amx_bf16 amx_tile", True)])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, tmp_path, flags, native):
    (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
    monkeypatch.setattr(annotator_module, "CPU_INFO", tmp_path / "cpuinfo")
    assert annotator_module.native_bfloat16(torch.device("cpu")) is native
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings())
    assert annotator.precision == ("bfloat16" if native else "float32")
    assert Annotator(load_model(device="cpu"), AnnotateSettings(precision="float32")).precision == "float32"


def test_an_actor_given_a_gpu_it_cannot_use_refuses_to_start(monkeypatch):
    import ray
    from camlabel.workers.actor import AnnotateActor

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"GPU \[0\] but CUDA is unusable"):
        AnnotateActor({}, AnnotateSettings())


def test_a_huge_photo_is_shrunk_in_uint8_first_to_nearly_the_same_input():
    """Above SHRINK_FIRST times the network's size an image is first shrunk as uint8 (a 60 MP photo
    never becomes 720 MB of floats); the network input differs from the direct path by rounding only."""
    from camlabel.workers import preprocess

    torch.manual_seed(0)
    small = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16), size=(600, 800), mode="bicubic")[0]
    image = (small.clamp(0, 1) * 255).to(torch.uint8)
    shrunk, valid = preprocess.prepare_batch([image], 64, "cpu")
    direct = image.float()[None] / 255
    direct = torch.nn.functional.interpolate(direct, size=tuple(valid[0].tolist()), mode="bilinear", antialias=True)
    mean = torch.tensor(preprocess.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(preprocess.IMAGENET_STD)[:, None, None]
    assert image.shape[-2] >= preprocess.SHRINK_FIRST * valid[0, 0]
    h, w = valid[0].tolist()
    difference = (shrunk[0, :, :h, :w] - (direct[0] - mean) / std).abs()
    assert difference.max() < 0.05 and difference.mean() < 0.01  # a few uint8 levels at most


def test_an_image_decoded_smaller_gives_boxes_and_masks_in_original_pixels():
    """A large JPEG decoded in draft mode (a quarter of each side) with its original size passed on
    gives the boxes the full decode gives, in the original's pixels."""
    import io

    from camlabel.workers.decode import decode, decode_reduced
    from PIL import Image
    from torchvision.ops import box_iou

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((1800, 1200)).save(buffer, "JPEG", quality=95)
    full = decode(buffer.getvalue())
    reduced, (width, height) = decode_reduced(buffer.getvalue(), shortest=160)
    assert tuple(reduced.shape) == (3, 300, 450) and (width, height) == (1800, 1200)
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=160, scales=(1.0,), flip=False))
    cat = [[281, 282, 285]]
    (whole,), (small,) = annotator([full], cat).labels, annotator([reduced], cat, [(height, width)]).labels

    def top_box(labels):
        p = max(labels, key=lambda p: p.score)
        return torch.tensor([[p.bbox[0], p.bbox[1], p.bbox[0] + p.bbox[2], p.bbox[1] + p.bbox[3]]])

    assert box_iou(top_box(whole), top_box(small)).item() > 0.9
    assert all(p.rle["size"] == [1200, 1800] for p in small)


def test_a_parts_model_batches_take_its_images_shape_by_shape_and_its_rows_keep_their_order(tmp_path):
    """Landscapes and portraits in turn: each model batch gets one shape group (one set of passes), and
    every row still describes its own image."""
    from camlabel.workers.actor import AnnotateActor, decode_batch

    paths = []
    for i in range(4):
        size = (96, 64) if i % 2 == 0 else (64, 96)  # landscape, portrait, landscape, portrait
        Image.fromarray(data.chelsea()).resize(size).save(tmp_path / f"cat{i}.png")
        paths.append(str(tmp_path / f"cat{i}.png"))
    actor = AnnotateActor({}, AnnotateSettings(input_size=64, scales=(1.0,), flip=False), batch_size=2)
    seen = []

    class Counted(Annotator):
        def __call__(self, images, *args):
            seen.append({shape_key(*image.shape[-2:], 64) for image in images})
            return super().__call__(images, *args)

    actor.annotator.__class__ = Counted
    rows = actor(decode_batch({"path": paths, "labels": ["281"] * 4}, 64)).to_pylist()
    assert [len(shapes) for shapes in seen] == [1, 1]
    assert [(r["path"], r["width"], r["height"]) for r in rows] == [
        (p, *((96, 64) if i % 2 == 0 else (64, 96))) for i, p in enumerate(paths)]
    assert all(r["annotations"] for r in rows)


def test_a_part_is_annotated_a_model_batch_at_a_time_and_written_as_one_file(tmp_path):
    """A part (what a crash loses) holds several model batches: the model sees batch_size images at a
    time, the part lands as one file per table, and the driver gets its counts."""
    import pyarrow.parquet as pq
    from camlabel.pipeline.plan import AnnotateAndWrite
    from PIL import Image

    paths = []
    for i in range(5):
        Image.fromarray(data.chelsea()).resize((96 + 8 * i, 64)).save(tmp_path / f"cat{i}.png")
        paths.append(str(tmp_path / f"cat{i}.png"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths.append(str(tmp_path / "broken.jpg"))
    stage = AnnotateAndWrite({}, AnnotateSettings(input_size=64, scales=(1.0,), flip=False), batch_size=2,
                             run_dir=str(tmp_path / "run"), decodes=True, earlier=False)
    model_batches = []

    class Counted(Annotator):
        def __call__(self, images, *args):
            model_batches.append(len(images))
            return super().__call__(images, *args)

    stage.actor.annotator.__class__ = Counted
    status = stage({"path": paths, "labels": ["281"] * 4 + ["-"] * 2}).to_pylist()
    assert model_batches == [2, 2, 1]  # four labelled images in two batches, then the unlabelled one
    assert [(s["annotated"], s["errors"]) for s in status] == [(5, 1)]
    assert [pq.read_metadata(p).num_rows for p in (tmp_path / "run" / "annotations").glob("part-*.parquet")] == [5]
    assert [pq.read_metadata(p).num_rows for p in (tmp_path / "run" / "errors").glob("part-*.parquet")] == [1]


def test_only_labelled_classes_cut_each_others_masks():
    """Two labelled classes are two objects: the hidden one's mask leaves out the one in front, its box spans
    it. Two named classes may be one object's near-synonyms: no mask is cut."""
    from camlabel.workers.annotator import WorkingMaps

    work = torch.zeros(1, 2, 32, 32)
    work[0, 0, 4:28, 4:28] = 0.8  # the hidden object, its map reaching over the one in front
    work[0, 1, 12:20, 12:20] = 1.0  # the one in front
    maps = WorkingMaps([0], work, None, torch.tensor([[3, 5]]), torch.ones(1, 2), torch.tensor([[128, 128]]),
                       (128, 128), [(128, 128)], torch.tensor([[3, 5]]), torch.ones(1, 2))
    rule = replace(annotator_module.RULES["instances"], large=None)
    (labelled,) = [p for p in maps.labels(rule)[0] if p.class_index == 3]
    (named,) = [p for p in replace(maps, named=True).labels(rule)[0] if p.class_index == 3]
    assert labelled.bbox == named.bbox == [16.0, 16.0, 96.0, 96.0]
    assert labelled.area < named.area - 30 * 30  # the one in front: cut from the labelled mask only


def _label(bbox: list[float], size: tuple[int, int]) -> PseudoLabel:
    """A PseudoLabel whose mask fills its box in an image of `size` (height, width)."""
    x, y, w, h = (int(v) for v in bbox)
    mask = np.zeros(size, dtype=np.uint8, order="F")
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return PseudoLabel(281, [float(v) for v in bbox], 0.7, w * h, rle)


def test_without_labels_the_classes_folded_into_an_objects_box_stay_on_it_as_runner_ups():
    size = (200, 300)
    found = [[replace(_label([20, 20, 100, 100], size), class_index=285, score=0.5),  # Egyptian cat, the cat
              replace(_label([22, 18, 100, 104], size), class_index=281, score=0.3),  # tabby, the same cat
              replace(_label([24, 24, 96, 96], size), class_index=281, score=0.35),  # tabby again, better
              replace(_label([18, 22, 104, 96], size), class_index=285, score=0.2),  # Egyptian cat again
              replace(_label([200, 50, 60, 60], size), class_index=673, score=0.4)]]  # a mouse beside it
    valid = torch.tensor([size])
    kept = annotator_module._one_box_per_object(found, valid, [size])[0]
    assert [(p.class_index, p.score) for p in kept] == [(285, 0.5), (673, 0.4)]
    # each other class once, at its best score; never the box's own class
    assert kept[0].runner_ups == [(281, 0.35)] and kept[1].runner_ups == []


def test_a_closer_look_replaces_a_box_and_its_mask_only_where_it_tightens_them():
    size, view = (300, 400), (80.0, 60.0, 120.0, 90.0)  # the view's (x, y, w, h) in the image
    p = _label([100, 70, 60, 60], size)
    inner = [True, True, True, True]
    seen = _label([30, 20, 40, 30], (90, 120))  # at (110, 80) in the image: inside p, smaller
    closer = tightened(p, seen, view, inner, size)
    assert closer.bbox == [110.0, 80.0, 40.0, 30.0] and closer.score == p.score and closer.area == 1200
    mask = mask_utils.decode(closer.rle)
    assert mask.shape == size and mask.sum() == 1200 and mask[80:110, 110:150].all()  # placed at the view's offset
    at_edge = _label([0, 20, 40, 30], (90, 120))  # on the view's left edge: the object may reach beyond the view
    assert tightened(p, at_edge, view, inner, size) is p
    assert tightened(p, at_edge, view, [False, True, True, True], size).bbox == [80.0, 80.0, 40.0, 30.0]  # the image's
    assert tightened(p, _label([10, 5, 100, 80], (90, 120)), view, inner, size) is p  # over 1.5 times p's area
    assert tightened(p, _label([85, 60, 20, 20], (90, 120)), view, inner, size) is p  # centred outside p


def test_a_small_swollen_box_is_tightened_by_a_closer_look(monkeypatch):
    canvas = torch.full((3, 480, 640), 128, dtype=torch.uint8)
    canvas[:, 216:252, 310:358] = photo(36, 48)  # a cat of 0.6% of the image
    cat = torch.tensor([[310.0, 216.0, 358.0, 252.0]])
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=160, scales=(1.0,), flip=False))
    swollen = _label([296, 204, 76, 57], (480, 640))  # 1.4% of the image: under the rule's closer_look
    assert swollen.bbox[2] * swollen.bbox[3] < annotator.rule.closer_look * 480 * 640
    views = []
    closer = annotator.closer

    def spied(crops, classes, sizes):
        views.extend((tuple(c.shape), k, s) for c, k, s in zip(crops, classes, sizes, strict=True))
        return closer(crops, classes, sizes)

    monkeypatch.setattr(annotator, "closer", spied)
    (looked,) = annotator.looked_closer([canvas], [[swollen]], [(480, 640)])[0:1]
    assert views == [((3, 171, 228), [281], (171, 228))]  # three times the box's sides, around its centre
    (p,) = looked

    def corners(b):
        return torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]]])

    assert box_iou(corners(p.bbox), cat).item() > box_iou(corners(swollen.bbox), cat).item() + 0.2
    ys, xs = np.nonzero(mask_utils.decode(p.rle))
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx(corners(p.bbox)[0].tolist(), abs=1)


def test_only_labelled_classes_boxes_are_looked_at_closer(monkeypatch):
    # without labels a box under 2% of its image is rarely named right, and looking closer moved no figure
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings(input_size=128, scales=(1.0,), flip=False))
    looked = []
    monkeypatch.setattr(annotator, "looked_closer", lambda images, found, sizes: looked.append(found) or found)
    cat = photo(240, 320)
    annotator([cat])
    assert looked == []
    labelled = annotator([cat], [[281]])
    assert looked == [labelled.labels]
