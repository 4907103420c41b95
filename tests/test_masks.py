"""Label-map export: planted maps give the expected labels, ignore band and overlap rule; PNGs round-trip."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from camlabel.pipeline.evaluate import SegmentationMeter
from camlabel.pipeline.masks import export_masks, label_map, png_bytes, voc_palette
from camlabel.pipeline.writers import atomic_write_table
from camlabel.schemas.tables import IMAGES
from camlabel.workers.models import imagenet_class_names
from PIL import Image


def planted_maps():
    maps = torch.zeros(2, 20, 40)
    maps[0, :, :15] = 1.0  # class A: left
    maps[0, :, 15:20] = 0.45  # A's uncertain rim
    maps[1, :, 25:] = 1.0  # class B: right
    maps[0, :, 30:35] = 0.95  # A claims part of B's region too, nearly as strongly
    return maps


def test_labels_band_and_close_calls():
    labels = label_map(planted_maps(), [4, 9], 20, 40, low=0.3, high=0.6, margin=0.1, ignore=255)
    row = labels[10]
    assert (row[:15] == 4).all()  # confidently A
    assert (row[16:19] == 255).all()  # between LOW and HIGH: ignored
    assert (row[21:24] == 0).all()  # below LOW everywhere: background
    assert (row[26:29] == 9).all() and (row[36:] == 9).all()  # B alone
    assert (row[31:34] == 255).all()  # A 0.95 vs B 1.0: too close to call
    no_band = label_map(planted_maps(), [4, 9], 20, 40, low=0.5, high=0.5, margin=0.0, ignore=255)
    assert (no_band[10, 16:19] == 0).all() and (no_band != 255).all()


def test_label_map_at_original_size_and_png_round_trip():
    labels = label_map(planted_maps(), [4, 999], 61, 123, ignore=65535)
    assert labels.shape == (61, 123) and set(labels.unique().tolist()) <= {0, 4, 999, 65535}
    wide = Image.open(__import__("io").BytesIO(png_bytes(labels, 65535)))
    np.testing.assert_array_equal(np.array(wide).astype(np.int32), labels.numpy())
    small = label_map(planted_maps(), [4, 9], 20, 40, ignore=255)
    indexed = Image.open(__import__("io").BytesIO(png_bytes(small, 255, voc_palette())))
    assert indexed.mode == "P"
    np.testing.assert_array_equal(np.array(indexed), small.numpy())


def test_export_masks_writes_one_png_per_image_at_its_original_size(tmp_path):
    """Images named a.jpg in two folders of a manifest's source, and an a.png beside one: three PNGs, each at
    its own size."""
    source = tmp_path / "images"
    maps = planted_maps()
    record = {"category_id": 5, "height": 20, "width": 40, "values": maps[0].to(torch.float16).numpy().tobytes()}
    images = ((1, "sub/a.jpg"), (2, "other/a.jpg"), (3, "sub/a.png"))
    rows = [{"image_id": name, "path": str(source / name), "width": 80 * k, "height": 40 * k,
             "label_source": "labels", "top_classes": [4], "top_scores": [0.9], "annotations": [],
             "heatmaps": [record], "method": "cam"} for k, name in images]
    run = tmp_path / "run"
    atomic_write_table(run / "annotations" / "part-1.parquet", pa.Table.from_pylist(rows, schema=IMAGES))
    (run / "manifest.json").write_text(json.dumps({"source": str(source / "list.csv"), "config": {"class_names": None},
                                                   "model": {"classes": 1000, "class_names": imagenet_class_names()}}))
    summary = export_masks(run, tmp_path / "masks", 0.3, 0.6)
    assert summary["images"] == 3 and summary["ignore"] == 65535  # ImageNet: 16-bit
    assert sorted(p.relative_to(tmp_path / "masks").as_posix() for p in (tmp_path / "masks").rglob("*.png")) == [
        "other/a.jpg.png", "sub/a.jpg.png", "sub/a.png.png"]
    for k, name in images:
        png = np.array(Image.open(tmp_path / "masks" / f"{name}.png"))
        assert png.shape == (40 * k, 80 * k) and png.dtype == np.uint16
        assert (png[:, :28 * k] == 5).all() and (png[:, -9 * k:] == 0).all()
    assert (tmp_path / "masks" / "classes.txt").read_text().splitlines()[:2] == ["background", "tench"]


def test_segmentation_meter_excludes_ignored_pixels():
    truth = torch.tensor([[1, 1, 0, 0]])
    predicted = torch.tensor([[1, 255, 1, 0]])
    meter = SegmentationMeter(255)
    meter.accumulate(predicted, truth)
    r = meter.compute()
    assert r["ignored_share"] == pytest.approx(0.25)
    assert r["pixel_accuracy"] == pytest.approx(2 / 3)
    assert r["per_class_iou"] == {"0": 0.5, "1": 0.5}  # class 1: 1 of {0, 2}; class 0: 1 of {2, 3}
    assert r["mIoU"] == pytest.approx(0.5)


def test_eval_label_maps_scores_a_hand_made_png_against_coco_masks(tmp_path, capsys):
    from camlabel.pipeline.cli import main
    from pycocotools import mask as mask_utils

    truth = np.zeros((4, 4), np.uint8)
    truth[:, :2] = 1  # the object: the left two columns
    rle = mask_utils.encode(np.asfortranarray(truth))
    rle["counts"] = rle["counts"].decode()
    gt = {"images": [{"id": 1, "file_name": "sub/a.jpg", "width": 4, "height": 4}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 4], "area": 8,
                           "iscrowd": 0, "segmentation": rle}]}
    gt["images"].append({"id": 2, "file_name": "sub/never_exported.jpg", "width": 4, "height": 4})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    predicted = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 255, 0], [1, 1, 1, 0]], np.uint8)
    for folder in ("sub", "other"):
        (tmp_path / "maps" / folder).mkdir(parents=True)
    Image.fromarray(predicted, mode="L").save(tmp_path / "maps" / "sub" / "a.jpg.png")
    # another folder's image of the same name, all object: scored instead, it would change every figure
    Image.fromarray(np.ones((4, 4), np.uint8), mode="L").save(tmp_path / "maps" / "other" / "a.jpg.png")
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--label-maps", str(tmp_path / "maps")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images_scored"] == 1 and r["images_without_png"] == 1
    # 15 pixels scored; class 1: 8 shared of 11 claimed; background: 4 shared of 7 (the ignored pixel aside)
    assert r["per_class_iou"] == {"0": round(4 / 7, 4), "1": round(8 / 11, 4)}
    assert r["mIoU"] == pytest.approx((4 / 7 + 8 / 11) / 2)
    assert r["pixel_accuracy"] == pytest.approx(12 / 15) and r["ignored_share"] == pytest.approx(1 / 16)

    png = tmp_path / "maps" / "sub" / "a.jpg.png"
    good = png.read_bytes()
    for bad, says in ((b"not a png", "not a readable PNG label map"), (None, "a RGB image; a label map holds one")):
        if bad is None:  # colours where class values go
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, "PNG")
        else:
            png.write_bytes(bad)
        assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--label-maps", str(tmp_path / "maps")]) == 2
        assert says in capsys.readouterr().err
    png.write_bytes(good)

    gt["images"][0]["width"] = 5  # a label map at another size than its image is not scored
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--label-maps", str(tmp_path / "maps")]) == 2
    assert "a.jpg.png is 4x4, its image sub/a.jpg 5x4" in capsys.readouterr().err

    gt["images"][0]["file_name"] = "a.jpg"  # a bare name that both folders hold: which PNG is meant is unknown
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--label-maps", str(tmp_path / "maps")]) == 2
    assert "a.jpg: 2 images match it" in capsys.readouterr().err
    gt["images"][0]["file_name"] = "sub/a.jpg"  # boxes drawn by hand, no masks: nothing to score a label map by
    gt["annotations"][0] = {k: gt["annotations"][0][k] for k in ("id", "image_id", "category_id", "bbox")}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--label-maps", str(tmp_path / "maps")]) == 2
    assert "gt.json holds objects without a segmentation" in capsys.readouterr().err
