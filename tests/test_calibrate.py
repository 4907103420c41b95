"""`camlabel calibrate` on planted objects with exact ground truth: the table it prints is what annotate
with that threshold scores, the choice follows its rule, and the YAML it writes is a valid config."""

import json
import os

import numpy as np
import pytest
import yaml
from camlabel.pipeline.calibrate import THRESHOLDS
from camlabel.pipeline.cli import main
from camlabel.pipeline.evaluate import evaluate
from camlabel.schemas.config import AnnotateSettings, load_config
from camlabel.workers.annotator import Annotator
from camlabel.workers.models import load_model
from pycocotools import mask as mask_utils
from torchvision.io import decode_image

from tests.conftest import CLASSES, planted


@pytest.fixture(scope="module")
def labelled_set(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    made = planted(root / "images", 8, seed=3)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    images, annotations = [], []
    for n, (path, name, (x0, y0, x1, y1), mask) in enumerate(made, start=1):
        images.append({"id": n, "file_name": os.path.basename(path), "width": mask.shape[1], "height": mask.shape[0]})
        rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        annotations.append({"id": n, "image_id": n, "category_id": CLASSES.index(name) + 1, "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "segmentation": rle})
    gt = root / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return trained[0] / "model", root, gt, made


def test_calibrate_chooses_by_its_rule_and_its_figures_are_what_annotate_scores(labelled_set, capsys):
    model_dir, root, gt, made = labelled_set
    out = root / "calibrated.yaml"
    capsys.readouterr()
    assert main(["calibrate", str(root / "images"), "--gt", str(gt), "--out", str(out), "--model-dir",
                 str(model_dir), "--input-size", "320", "--scales", "1.0", "--no-flip"]) == 0
    result = json.loads(capsys.readouterr().out)
    table = {float(t): v for t, v in result["box_thresholds"].items()}
    assert sorted(table) == list(THRESHOLDS) and result["images"] == len(made)
    assert result["threshold"] == max(THRESHOLDS, key=lambda t: table[t]["corloc"] + table[t]["bbox_AP50"])
    masks = {float(t): v for t, v in result["mask_thresholds"].items()}
    assert result["mask_threshold"] == max(THRESHOLDS, key=lambda t: masks[t]["mean_mask_iou"] + masks[t]["segm_AP50"])
    assert table[result["threshold"]]["corloc"] >= 0.75
    assert len({v["mean_mask_iou"] for v in table.values()}) > 3  # the thresholds really differ

    config = load_config(out, {"source": str(root / "images"), "out": str(root / "run")})
    assert (config.threshold, config.mask_threshold) == (result["threshold"], result["mask_threshold"])
    assert config.model_dir == str(model_dir) and yaml.safe_load(out.read_text())["input_size"] == 320

    # The same threshold through the Annotator, scored by `eval`, gives the calibration's figures.
    settings = AnnotateSettings(input_size=320, scales=(1.0,), flip=False, threshold=result["threshold"],
                                mask_threshold=result["threshold"])
    annotator = Annotator(load_model(model_dir=model_dir, device="cpu"), settings)
    pictures = [decode_image(path) for path, _, _, _ in made]
    found = annotator(pictures, [[CLASSES.index(name)] for _, name, _, _ in made]).labels
    preds = [{"image_id": n, "category_id": p.class_index + 1, "bbox": p.bbox, "score": p.score,
              "segmentation": p.rle} for n, labels in enumerate(found, start=1) for p in labels]
    direct = evaluate(gt, preds)
    for key, value in table[result["threshold"]].items():
        assert direct[key] == pytest.approx(value, abs=1e-4), key
    assert result["precision_by_score"] == direct["bbox_precision_by_score"]
    assert sum(b["boxes"] for b in result["precision_by_score"].values()) == direct["predictions"] > 0  # each once

    # Boxes drawn by hand, without masks (nor iscrowd or area): the same box figures, and the masks cut where the
    # boxes were scored, at the box threshold (a KeyError in COCOeval before)
    drawn = json.loads(gt.read_text())
    drawn["annotations"] = [{k: a[k] for k in ("id", "image_id", "category_id", "bbox")} for a in drawn["annotations"]]
    (root / "drawn.json").write_text(json.dumps(drawn))
    assert main(["calibrate", str(root / "images"), "--gt", str(root / "drawn.json"), "--out",
                 str(root / "drawn.yaml"), "--model-dir", str(model_dir), "--input-size", "320", "--scales", "1.0",
                 "--no-flip"]) == 0
    boxes_only = json.loads(capsys.readouterr().out)
    assert boxes_only["threshold"] == boxes_only["mask_threshold"] == result["threshold"]
    assert boxes_only["mask_thresholds"] == {}
    for t, figures in boxes_only["box_thresholds"].items():
        assert figures == {k: v for k, v in result["box_thresholds"][t].items() if k not in ("mean_mask_iou",
                                                                                             "segm_AP50")}


def test_calibrating_for_predicted_classes_maps_no_labels_and_scores_what_annotate_does_without(
        labelled_set, capsys, monkeypatch):
    """--predicted: the maps are those of annotate without labels (the model names the classes), and the
    table's figures at the chosen threshold are what such an annotate run scores."""
    import camlabel.pipeline.calibrate as calibrate_module

    model_dir, root, gt, made = labelled_set
    given = []

    class Recorded(Annotator):
        def work(self, images, labels=None, sizes=None):
            given.append(labels)
            return super().work(images, labels, sizes)

    monkeypatch.setattr(calibrate_module, "Annotator", Recorded)
    capsys.readouterr()
    assert main(["calibrate", str(root / "images"), "--gt", str(gt), "--out", str(root / "predicted.yaml"),
                 "--model-dir", str(model_dir), "--input-size", "320", "--scales", "1.0", "--no-flip",
                 "--predicted"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert given and all(labels is None for labels in given)
    table = {float(t): v for t, v in result["box_thresholds"].items()}[result["threshold"]]
    assert table["corloc"] >= 0.75  # a two-class model names discs and squares

    settings = AnnotateSettings(input_size=320, scales=(1.0,), flip=False, threshold=result["threshold"],
                                mask_threshold=result["threshold"])
    annotator = Annotator(load_model(model_dir=model_dir, device="cpu"), settings)
    found = annotator([decode_image(path) for path, _, _, _ in made]).labels
    preds = [{"image_id": n, "category_id": p.class_index + 1, "bbox": p.bbox, "score": p.score,
              "segmentation": p.rle} for n, labels in enumerate(found, start=1) for p in labels]
    direct = evaluate(gt, preds)
    for key, value in table.items():
        assert direct[key] == pytest.approx(value, abs=1e-4), key


def test_the_calibrated_config_keeps_every_annotate_setting():
    import yaml
    from camlabel.pipeline.calibrate import calibrated_config
    from camlabel.schemas.config import JobConfig

    config = JobConfig(source="x", out="y", precision="bfloat16", top_k=4, scales=[1.0, 2.0], flip=False)
    written = yaml.safe_load(calibrated_config(config, {"threshold": 0.4, "mask_threshold": 0.55}))
    assert written["precision"] == "bfloat16" and written["top_k"] == 4 and written["scales"] == [1.0, 2.0]
    assert written["flip"] is False and (written["threshold"], written["mask_threshold"]) == (0.4, 0.55)


def test_ground_truth_meets_its_images_by_their_folders_as_eval_matches_them(labelled_set, monkeypatch):
    """Two folders' `x.png`: the ground truth's `sub1/x.png` was met by whichever the listing named last (a bare
    name kept one of them), so thresholds were chosen on another image; a bare name two folders hold is refused."""
    import shutil

    import camlabel.pipeline.calibrate as calibrate_module
    from camlabel.pipeline.calibrate import CalibrationSet
    from camlabel.pipeline.evaluate import EvaluationError

    model_dir, root, gt, made = labelled_set
    images = root / "folders"
    for folder, (path, _, _, _) in zip(("sub1", "sub2"), made, strict=False):
        (images / folder).mkdir(parents=True)
        shutil.copy(path, images / folder / "x.png")
    dataset = json.loads(gt.read_text())
    dataset["images"] = [{**dataset["images"][0], "file_name": "sub1/x.png"}]
    dataset["annotations"] = dataset["annotations"][:1]
    (root / "folders.json").write_text(json.dumps(dataset))
    read = []
    monkeypatch.setattr(calibrate_module, "read_bytes", lambda path: read.append(path) or open(path, "rb").read())
    settings = AnnotateSettings(input_size=320, scales=(1.0,), flip=False)
    loaded = load_model(model_dir=model_dir, device="cpu")
    found = CalibrationSet(str(images), root / "folders.json", loaded, settings, progress=False)
    assert len(found) == 1 and read == [str(images / "sub1" / "x.png")]
    dataset["images"][0]["file_name"] = "x.png"
    (root / "folders.json").write_text(json.dumps(dataset))
    with pytest.raises(EvaluationError, match="x.png: 2 images match it"):
        CalibrationSet(str(images), root / "folders.json", loaded, settings, progress=False)
