"""Evaluator figures on cases computed by hand."""

import json

import numpy as np
import pytest
from camlabel.pipeline.cli import main
from camlabel.pipeline.evaluate import EvaluationError, category_mapping, evaluate
from pycocotools import mask as mask_utils


def rle_box(x, y, w, h, size=(100, 100)):
    m = np.zeros(size, np.uint8)
    m[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


@pytest.fixture
def gt_path(tmp_path):
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 5, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600,
                         "iscrowd": 0, "segmentation": rle_box(10, 10, 40, 40)}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def pred(x, y=10, score=0.9, w=40, h=40):
    return {"image_id": 1, "category_id": 5, "bbox": [x, y, w, h], "score": score, "segmentation": rle_box(x, y, w, h)}


def test_a_perfect_prediction_scores_one(gt_path):
    r = evaluate(gt_path, [pred(10)])
    assert r["corloc"] == 1 and r["mean_box_iou"] == pytest.approx(1) and r["mean_mask_iou"] == pytest.approx(1)
    assert r["bbox_AP"] == pytest.approx(1) and r["segm_AP50"] == pytest.approx(1)


def test_shifted_boxes_score_the_hand_computed_iou(gt_path):
    r = evaluate(gt_path, [pred(20)])  # overlap 30x40 = 1200, union 2000
    assert r["mean_box_iou"] == pytest.approx(0.6, abs=1e-6) and r["mean_mask_iou"] == pytest.approx(0.6)
    assert r["corloc"] == 1 and r["bbox_AP50"] == pytest.approx(1)
    assert r["bbox_AP"] == pytest.approx(0.3)  # IoU 0.6 passes the thresholds 0.5, 0.55 and 0.6 of ten
    r = evaluate(gt_path, [pred(30)])  # overlap 800, union 2400
    assert r["mean_box_iou"] == pytest.approx(1 / 3, abs=1e-6) and r["corloc"] == 0


def test_boxes_drawn_by_hand_are_scored_without_masks(gt_path, capsys):
    """A ground truth of boxes alone, as annotation tools and hand-drawn sets write it (no iscrowd, area or
    segmentation), was a KeyError traceback in COCOeval; now its boxes are scored as a full one's are, and no
    mask figure is given (not a mean mask IoU of 0)."""
    full = json.loads(gt_path.read_text())
    boxes = {**full, "annotations": [{k: a[k] for k in ("id", "image_id", "category_id", "bbox")}
                                     for a in full["annotations"]]}
    drawn = gt_path.with_name("drawn.json")
    drawn.write_text(json.dumps(boxes))
    preds = [pred(20, score=0.7), pred(60, score=0.4)]
    r, whole = evaluate(drawn, preds), evaluate(gt_path, preds)
    assert r["mean_mask_iou"] is None and "segm_AP" not in r and whole["segm_AP50"] == pytest.approx(1)
    for key in ("corloc", "mean_box_iou", "bbox_AP", "bbox_AP50", "boxes_per_object", "bbox_precision_by_score"):
        assert r[key] == whole[key], key
    capsys.readouterr()
    results = gt_path.with_name("results.json")
    results.write_text(json.dumps(preds))
    assert main(["eval", "--gt", str(drawn), "--pred", str(results)]) == 0
    assert json.loads(capsys.readouterr().out)["bbox_AP"] == pytest.approx(0.3)


def test_corloc_uses_the_top_scoring_box_of_the_class(gt_path):
    r = evaluate(gt_path, [pred(10, score=0.2), pred(60, score=0.8)])
    assert r["corloc"] == 0
    assert evaluate(gt_path, [pred(10, score=0.8), pred(60, score=0.2)])["corloc"] == 1


def test_precision_by_score_counts_the_boxes_of_each_bin_that_match_an_object(gt_path):
    # the object is matched once, by its best box at IoU >= 0.5 (0.6 at x=20); a second hit on it is wrong
    preds = [pred(20, score=0.07), pred(10, score=0.06), pred(60, score=0.6), pred(12, score=0.01),
             {**pred(10, score=0.9), "category_id": 8}]
    by_score = evaluate(gt_path, preds)["bbox_precision_by_score"]
    assert list(by_score) == ["0.0-0.05", "0.05-0.1", "0.1-0.2", "0.2-0.3", "0.3-0.5", ">=0.5"]
    assert by_score["0.05-0.1"] == {"boxes": 2, "precision": 0.5}  # the class the ground truth lacks is not judged
    assert by_score["0.0-0.05"] == by_score[">=0.5"] == {"boxes": 1, "precision": 0.0}
    assert by_score["0.3-0.5"] == {"boxes": 0, "precision": None}  # no box: no share, not a share of 0
    assert evaluate(gt_path, [])["bbox_precision_by_score"][">=0.5"] == {"boxes": 0, "precision": None}


def test_empty_unknown_and_incomplete_predictions(gt_path, tmp_path, capsys):
    r = evaluate(gt_path, [])
    assert r["corloc"] == 0 and r["bbox_AP"] == 0 and r["predictions"] == 0
    with pytest.raises(EvaluationError, match="1 predicted image ids are not in"):
        evaluate(gt_path, [{**pred(10), "image_id": 7}])
    bad = pred(10)
    del bad["score"]
    with pytest.raises(EvaluationError, match="prediction 0: lacks score"):
        evaluate(gt_path, [bad])
    # malformed ones are named, not raised inside pycocotools (a traceback) or scored as something else
    for field, value, says in (("bbox", "abc", "is not four numbers"), ("bbox", [1, 2, 3], "is not four numbers"),
                               ("bbox", [float("nan"), 1, 2, 3], "is not four numbers"),
                               ("bbox", [50, 40, 10, -5], "negative width or height"), ("score", "x", "not a number"),
                               ("category_id", [5], "is not an integer"), ("segmentation", "zz", "neither an RLE")):
        with pytest.raises(EvaluationError, match=f"prediction 1: {field} .* {says}"):
            evaluate(gt_path, [pred(10), {**pred(10), field: value}])
    with pytest.raises(EvaluationError, match="prediction 0: 7 is not an object"):
        evaluate(gt_path, [7])
    missing = tmp_path / "nope.json"
    assert main(["eval", "--gt", str(gt_path), "--pred", str(missing)]) == 2
    assert "cannot read predictions" in capsys.readouterr().err


def test_a_ground_truth_the_scoring_cannot_read_is_named(tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}], "categories": [{"id": 5}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5}]}  # no bbox: a KeyError inside the meter
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(EvaluationError, match="gt.json: object 0 .* lacks an image_id, a category_id or a bbox"):
        evaluate(tmp_path / "gt.json", [pred(10)])
    gt["annotations"], gt["images"] = [], [{"id": 1}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(EvaluationError, match="gt.json: image 0 .* lacks an integer id, width or height"):
        evaluate(tmp_path / "gt.json", [])
    (tmp_path / "gt.json").write_text("[]")  # pycocotools asserts a dict
    with pytest.raises(EvaluationError, match="cannot read ground truth .*AssertionError"):
        evaluate(tmp_path / "gt.json", [])


def test_map_meter_on_planted_maps():
    import torch

    from bench.map_meter import MapMeter

    heatmap = torch.zeros(40, 40)
    heatmap[10:20, 10:30] = 1.0  # exactly the object
    heatmap[30:34, 0:4] = 0.5  # a weaker blob elsewhere
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[10:20, 10:30] = True
    meter = MapMeter()
    meter.accumulate(heatmap, torch.tensor([[10, 10, 20, 10]]), mask)
    r = meter.compute()
    assert r["MaxBoxAccV2"] == 1.0 and r["PxAP"] == pytest.approx(1.0)
    shifted = MapMeter()
    shifted.accumulate(heatmap, torch.tensor([[20, 10, 20, 10]]), mask)  # box IoU 1/3 with the blob
    r = shifted.compute()
    assert r["MaxBoxAcc@0.3"] == 1.0 and r["MaxBoxAcc@0.5"] == 0.0 and r["MaxBoxAcc@0.7"] == 0.0
    assert r["MaxBoxAccV2"] == pytest.approx(1 / 3)
    noisy = MapMeter()
    noisy.accumulate(torch.full((40, 40), 0.5), torch.tensor([[10, 10, 20, 10]]), mask)
    assert noisy.compute()["PxAP"] == pytest.approx(200 / 1600)  # a flat map: precision = mask share


def test_corloc_by_object_size_and_company_counts_each_object_in_its_bin():
    from camlabel.pipeline.evaluate import LocalisationMeter

    meter = LocalisationMeter()  # a 100 x 100 image: objects of 1%, 16% and 36% of it
    gt = [{"category_id": 1, "bbox": [0, 0, 10, 10]}, {"category_id": 2, "bbox": [20, 20, 40, 40]},
          {"category_id": 3, "bbox": [0, 40, 60, 60]}]
    preds = [{"category_id": 1, "bbox": [0, 0, 10, 10], "score": 1.0},  # exact
             {"category_id": 2, "bbox": [20, 20, 20, 40], "score": 1.0},  # half of it: IoU 0.5, a hit
             {"category_id": 3, "bbox": [0, 40, 30, 30], "score": 1.0}]  # a quarter: IoU 0.25, a miss
    meter.accumulate(gt, preds, 100, 100)
    r = meter.compute()
    assert r["corloc"] == pytest.approx(2 / 3)
    assert r["corloc_by_size"] == {"<3%": {"objects": 1, "corloc": 1.0}, "3-8%": {"objects": 0, "corloc": None},
                                   "8-20%": {"objects": 1, "corloc": 1.0}, ">=20%": {"objects": 1, "corloc": 0.0}}
    meter.accumulate(gt[:1], [], 100, 100)  # an object alone in its image, missed
    assert meter.compute()["corloc_by_company"] == {"alone": {"objects": 1, "corloc": 0.0},
                                                    "with others": {"objects": 3, "corloc": 2 / 3}}


def test_boxes_per_object_counts_overlapping_boxes_and_parts(gt_path):
    whole, part, far = pred(10), pred(15, 15, 0.5, 10, 10), pred(70, 70, 0.4, 20, 20)  # part lies inside
    r = evaluate(gt_path, [whole, part, far])
    assert r["boxes_per_object"] == 2 and r["corloc"] == 1
    assert evaluate(gt_path, [whole])["boxes_per_object"] == 1


def test_crowd_regions_are_not_objects(tmp_path, gt_path):
    gt = json.loads(gt_path.read_text())
    gt["annotations"].append({"id": 2, "image_id": 1, "category_id": 5, "bbox": [60, 60, 30, 30], "area": 900,
                              "iscrowd": 1, "segmentation": rle_box(60, 60, 30, 30)})
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(gt))
    r = evaluate(path, [pred(10)])
    assert r["objects"] == 1 and r["corloc"] == 1  # the crowd region is not a missed object


def test_a_predicted_dataset_is_matched_to_the_ground_truth_by_category_name_else_id(gt_path):
    """camlabel's export numbers class i as id i + 1; the ground truth has its own ids."""
    images = [{"id": 3, "file_name": "a.jpg", "width": 100, "height": 100}]
    by_name = {"images": images, "categories": [{"id": 1, "name": "Thing"}, {"id": 5, "name": "other"}],
               "annotations": [{**pred(10), "image_id": 3, "category_id": 1}]}
    assert evaluate(gt_path, by_name)["corloc"] == 1
    assert evaluate(gt_path, {**by_name, "categories": [{"id": 1, "name": "other"}]})["corloc"] == 0
    unnamed = {**by_name, "categories": [{"id": 5, "name": "unknown"}],
               "annotations": [{**pred(10), "image_id": 3, "category_id": 5}]}
    assert evaluate(gt_path, unnamed)["corloc"] == 1  # no name matches: the same id


def test_names_that_differ_only_in_case_are_not_one_category():
    """ImageNet's Cardigan (a dog, camlabel's id 265) and cardigan (a sweater, 475): a ground truth of sweaters
    takes camlabel's sweater, not its dog; a name unique on both sides still matches in any case."""
    camlabel = [{"id": 265, "name": "Cardigan"}, {"id": 475, "name": "cardigan"}, {"id": 2, "name": "goldfish"}]
    gt = [{"id": 1, "name": "cardigan"}, {"id": 2, "name": "Goldfish"}]
    assert category_mapping(camlabel, gt) == {475: 1, 2: 2}
    assert category_mapping(gt, camlabel) == {1: 475, 2: 2}
    assert category_mapping([{"id": 9, "name": "CARDIGAN"}], camlabel) == {}  # two names fold to it: no guess


def test_a_predicted_dataset_is_matched_to_the_ground_truth_by_path_not_bare_name(tmp_path):
    """Ground truth names images below its folder, the run by absolute path; two folders hold an a.jpg. Matched
    by bare name, both predictions would land on one image: one object found twice, the other missed."""
    gt = {"images": [{"id": 1, "file_name": "sub/a.jpg", "width": 100, "height": 100},
                     {"id": 2, "file_name": "other/a.jpg", "width": 100, "height": 100}],
          "categories": [{"id": 5, "name": "thing"}],
          "annotations": [{"id": i, "image_id": i, "category_id": 5, "bbox": [x, 10, 40, 40], "area": 1600,
                           "iscrowd": 0, "segmentation": rle_box(x, 10, 40, 40)} for i, x in ((1, 10), (2, 50))]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    images = [{"id": 7, "file_name": "/data/run/other/a.jpg", "width": 100, "height": 100},
              {"id": 8, "file_name": "/data/run/sub/a.jpg", "width": 100, "height": 100}]
    predicted = {"images": images, "categories": [{"id": 1, "name": "thing"}],
                 "annotations": [{**pred(50), "image_id": 7, "category_id": 1}, {**pred(10), "image_id": 8,
                                                                                   "category_id": 1}]}
    assert evaluate(tmp_path / "gt.json", predicted)["corloc"] == 1
    gt["images"][1]["file_name"] = "a.jpg"  # named bare beside sub/a.jpg: /data/run/other/a.jpg matches no folder
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(EvaluationError, match="2 images match it"):
        evaluate(tmp_path / "gt.json", predicted)
    with pytest.raises(EvaluationError, match="no annotations"):
        evaluate(tmp_path / "gt.json", {"images": images})


def test_the_bench_counts_objects_named_right_by_their_best_box_or_its_runner_ups():
    from camlabel.workers.boxes import PseudoLabel

    from bench.localisation import named_right

    def label(c, bbox, score, runner_ups=()):
        return PseudoLabel(c, bbox, score, 1, {"size": [500, 500], "counts": "0"}, list(runner_ups))

    objects = [{"category_id": 282, "bbox": [0, 0, 100, 100]},  # a tabby (class 281)
               {"category_id": 6, "bbox": [200, 0, 100, 100]},  # class 5
               {"category_id": 9, "bbox": [400, 400, 10, 10]}]  # no box covers it
    found = [label(285, [2, 0, 100, 98], 0.5, [(281, 0.3)]),  # the tabby's best box: Egyptian cat, or tabby
             label(281, [0, 0, 100, 100], 0.2),  # right, but not its best box
             label(5, [205, 5, 90, 95], 0.4),
             label(8, [400, 400, 40, 40], 0.9)]  # IoU 1/16 with the last object: covers nothing
    assert named_right(objects, found).tolist() == [2, 1, 1]
