"""Maps to boxes and masks on planted shapes whose boxes and masks are known exactly."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from camlabel.workers import boxes
from camlabel.workers.boxes import (
    PAPER_RULE,
    RULES,
    BoxRule,
    affinity_refine,
    component_stats,
    connected_components,
    propagate_components,
    semantic_spread,
    working_maps,
)
from camlabel.workers.boxes import pseudo_labels as labels_from_work
from pycocotools import mask as mask_utils
from scipy import ndimage

BOTH_WAYS = pytest.mark.parametrize("components", [connected_components, propagate_components])


@BOTH_WAYS
def test_components_match_scipy_8_connectivity(components):
    rng = np.random.default_rng(0)
    masks = rng.random((6, 40, 50)) > 0.55
    labels = components(torch.from_numpy(masks)).numpy()
    for m, ours in zip(masks, labels, strict=True):
        expected, count = ndimage.label(m, structure=np.ones((3, 3)))
        assert len(np.unique(ours[m])) == count
        # the same partition: every scipy component maps to exactly one of ours and back
        pairs = {(a, b) for a, b in zip(expected[m], ours[m], strict=True)}
        assert len(pairs) == count
        assert (ours[~m] == 0).all()


@BOTH_WAYS
def test_a_long_winding_component_is_one_label_the_largest_index_plus_one(components):
    snake = torch.zeros(31, 31, dtype=torch.bool)
    snake[::2] = True  # rows joined alternately at the right and the left end: one 511-pixel path
    snake[1::4, -1] = True
    snake[3::4, 0] = True
    labels = components(snake[None])[0]
    flat = torch.arange(31 * 31).view(31, 31)
    assert labels[snake].unique().tolist() == [int(flat[snake].max()) + 1]
    assert (labels[~snake] == 0).all()


def test_scipy_and_propagation_give_the_same_ids():
    """The CPU and GPU paths must label identically, so a run's output does not depend on the device."""
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((5, 33, 47)) > 0.5)
    masks[2] = False  # an empty map among others
    assert torch.equal(connected_components(masks), propagate_components(masks))


def test_component_stats_area_and_peak():
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 1:3, 1:4] = True  # 6 pixels
    mask[0, 6:9, 6:9] = True  # 9 pixels
    mask[0, 0, 9] = mask[0, 1, 8] = True  # a diagonal pair: 2 pixels, a 2x2 box
    values = torch.rand(1, 10, 10)
    owner, ids, area, peak, mass, box = component_stats(connected_components(mask), values)
    assert owner.tolist() == [0, 0, 0]
    assert sorted(area.tolist()) == [2.0, 6.0, 9.0]
    assert sorted(box.tolist()) == [[1, 1, 4, 3], [6, 6, 9, 9], [8, 0, 10, 2]]  # x1, y1, x2, y2
    assert sorted(peak.tolist()) == sorted([float(values[0, 1:3, 1:4].max()), float(values[0, 6:9, 6:9].max()),
                                            float(max(values[0, 0, 9], values[0, 1, 8]))])
    assert sorted(mass.tolist()) == pytest.approx(sorted([float(values[0, 1:3, 1:4].sum()),
                                                          float(values[0, 6:9, 6:9].sum()),
                                                          float(values[0, 0, 9] + values[0, 1, 8])]))


def pseudo_labels(maps, classes, scores, valid, input_size, sizes, rule=RULES["instances"]):
    return labels_from_work(working_maps(maps, valid, input_size), classes, scores, valid, input_size, sizes, rule)


def blob_maps(shape=(64, 128), blobs=((8, 24, 32, 64, 1.0),)):
    maps = torch.zeros(1, 1, *shape)
    for top, bottom, left, right, value in blobs:
        maps[0, 0, top:bottom, left:right] = value
    return maps


@pytest.mark.parametrize("original", [(128, 192), (37, 55), (1000, 1500)])
def test_boxes_map_back_to_original_pixels(original):
    # network input 64x128, the image fills 64x96 of it (padding on the right), maps at input resolution
    maps = blob_maps()
    valid = torch.tensor([[64, 96]])
    (found,) = pseudo_labels(maps, torch.tensor([[7]]), torch.tensor([[0.9]]), valid, (64, 128), [original])
    assert len(found) == 1
    sy, sx = original[0] / 64, original[1] / 96
    expected = np.array([32 * sx, 8 * sy, 32 * sx, 16 * sy])
    tolerance = 4 * max(sx, sy) + 1  # one working cell (stride 4) either side
    np.testing.assert_allclose(found[0].bbox, expected, atol=tolerance)
    assert found[0].class_index == 7 and found[0].score == pytest.approx(0.9)
    decoded = mask_utils.decode(found[0].rle)
    assert decoded.shape == original
    assert isinstance(found[0].rle["counts"], str)
    assert decoded.sum() == found[0].area
    assert found[0].area == pytest.approx(32 * sx * 16 * sy, rel=0.35)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("rule", ["instances", "paper"])
def test_a_planted_blob_maps_to_its_exact_box_through_padding_and_rescaling(scale, rule):
    """The blob covers input rows 8-23 and columns 32-63 of an image that fills 64x96 of a 64x128 input
    (padding on the right); at `scale` times that size the box is exactly those pixels times `scale`,
    and an instance's mask fills exactly its box's rows and columns."""
    original = (64 * scale, 96 * scale)
    rules = {"instances": RULES["instances"], "paper": PAPER_RULE}
    (found,) = pseudo_labels(blob_maps(), torch.tensor([[7]]), torch.tensor([[0.9]]), torch.tensor([[64, 96]]),
                             (64, 128), [original], rules[rule])
    assert [p.bbox for p in found] == [[32.0 * scale, 8.0 * scale, 32.0 * scale, 16.0 * scale]]
    if rule == "instances":
        ys, xs = np.nonzero(mask_utils.decode(found[0].rle))
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [32 * scale, 8 * scale, 64 * scale, 24 * scale]


def test_every_strong_component_is_an_instance_and_the_paper_rule_keeps_one_box():
    maps = blob_maps(blobs=((4, 20, 4, 30, 1.0), (40, 60, 80, 120, 0.8), (40, 44, 4, 8, 0.3)))
    args = (torch.tensor([[3]]), torch.tensor([[0.5]]), torch.tensor([[64, 128]]), (64, 128), [(64, 128)])
    (found,) = pseudo_labels(maps, *args, rule=RULES["instances"])
    assert len(found) == 2  # the 0.3 peak is below the threshold
    # score = P(class) x peak x share of the map's mass: 0.5 x 1.0 x 416/1061 and 0.5 x 0.8 x 640/1061
    assert found[0].score == pytest.approx(0.5 * 416 / 1061, rel=0.15)
    assert found[1].score == pytest.approx(0.5 * 0.8 * 640 / 1061, rel=0.15)
    np.testing.assert_allclose(found[0].bbox, [4, 4, 26, 16], atol=4)
    np.testing.assert_allclose(found[1].bbox, [80, 40, 40, 20], atol=4)
    (paper,) = pseudo_labels(maps, *args, rule=PAPER_RULE)
    assert len(paper) == 1
    np.testing.assert_allclose(paper[0].bbox, [80, 40, 40, 20], atol=4)  # the largest component
    assert paper[0].area > 26 * 16 + 40 * 20  # the mask keeps every pixel above 20%


def test_padded_targets_and_empty_maps_give_nothing():
    maps = torch.zeros(2, 2, 16, 16)
    maps[0, 0, 2:8, 2:8] = 1
    maps[0, 1, 2:8, 2:8] = 1  # class -1: padding, must be ignored
    found = pseudo_labels(maps, torch.tensor([[1, -1], [2, 3]]), torch.ones(2, 2), torch.tensor([[16, 16]] * 2),
                          (16, 16), [(16, 16), (16, 16)])
    assert [len(f) for f in found] == [1, 0]


def test_affinity_refinement_stops_at_colour_edges():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0  # two flat regions split at column 16
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 10:20, 4:8] = 1.0  # evidence inside the left region only
    refined = affinity_refine(maps, image, torch.ones(1, 32, 32, dtype=torch.bool), sigma=0.1)
    assert refined[0, 0, :, :16].sum() > 0.99 * maps.sum()
    assert refined[0, 0, :, 16:].max() < 1e-6
    assert refined[0, 0, :, 10:14].mean() > 0.3 * refined[0, 0, :, :4].mean() + 1e-3  # it spread


@pytest.mark.parametrize("spread", ["spread_shifted", "spread_unfolded"])  # the CPU's step, the GPU's
def test_each_refinement_step_is_the_colour_weighted_mean_of_the_window(spread, monkeypatch):
    monkeypatch.setattr(boxes, "spread_shifted", getattr(boxes, spread))  # what a CPU tensor runs
    torch.manual_seed(0)
    image, maps = torch.rand(2, 3, 9, 11), torch.rand(2, 2, 9, 11)
    valid = torch.ones(2, 9, 11, dtype=torch.bool)
    valid[1, 6:] = False  # padding takes no part in the walk
    expected = maps.clone()
    for _ in range(3):  # the definition, pixel by pixel
        step = torch.zeros_like(expected)
        for b in range(2):
            for y in range(9):
                for x in range(11):
                    ys, xs = slice(max(0, y - 2), y + 3), slice(max(0, x - 2), x + 3)
                    w = torch.exp(-(image[b, :, ys, xs] - image[b, :, y, x, None, None]).pow(2).sum(0) / (2 * 0.15**2))
                    w = w * valid[b, ys, xs]
                    step[b, :, y, x] = (expected[b, :, ys, xs] * w).sum((1, 2)) / w.sum().clamp(min=1e-7)
        expected = step
    torch.testing.assert_close(affinity_refine(maps, image, valid, steps=3), expected, atol=1e-5, rtol=1e-5)


def test_evidence_spreads_to_the_cells_that_share_its_features_and_no_further():
    # an 8x8 map whose evidence sits on one cell of an object (columns 0-3, features [1, 0]); the
    # background (columns 4-5) has features [0, 1]; columns 6-7 are padding with the object's features
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2, 1] = 1.0
    features = torch.zeros(1, 2, 8, 8)
    features[0, 0, :, :4] = features[0, 0, :, 6:] = 1.0
    features[0, 1, :, 4:6] = 1.0
    inside = torch.zeros(1, 8, 8, dtype=torch.bool)
    inside[0, :, :6] = True
    spread = semantic_spread(maps, features, inside)[0, 0]
    # every object cell gets the object's mean evidence (then the max is 1): SPREAD_MIX of the max
    expected = torch.full((8, 4), boxes.SPREAD_MIX)
    expected[2, 1] = 1.0
    torch.testing.assert_close(spread[:, :4], expected)
    assert spread[:, 4:].abs().max() == 0  # the background and the padding get nothing


def test_the_spread_weighs_cells_by_their_features_cosine_to_the_fourth_power():
    torch.manual_seed(0)
    maps, features = torch.rand(2, 4, 4, 6), torch.rand(2, 5, 4, 6) - 0.3  # two sets of two maps an image
    inside = torch.ones(2, 4, 6, dtype=torch.bool)
    inside[1, :, 4:] = False
    unit = torch.nn.functional.normalize(features.flatten(2), dim=1)  # the definition, cell by cell
    expected = torch.zeros_like(maps)
    for b in range(2):
        giving = inside[b].flatten()
        for i in range(24):
            weights = torch.stack([(unit[b, :, i] @ unit[b, :, j]).clamp(min=0) ** 4 * giving[j] for j in range(24)])
            expected[b, :, i // 6, i % 6] = (maps[b].flatten(1)[:, giving] * weights[giving]).sum(1) / weights.sum()
    expected = expected * inside[:, None]
    expected = expected / expected.flatten(2).amax(2)[..., None, None]
    own = maps * inside[:, None] / (maps * inside[:, None]).flatten(2).amax(2)[..., None, None]
    partner = own[:, [1, 0, 3, 2]]  # each map's rival is the other map of its set
    mixed = boxes.SPREAD_MIX * expected * (1 - (partner - own).clamp(min=0)) + (1 - boxes.SPREAD_MIX) * own
    torch.testing.assert_close(semantic_spread(maps, features, inside, set_size=2),
                               mixed / mixed.flatten(2).amax(2)[..., None, None])


def test_classes_compete_for_the_spread_and_a_lone_class_does_not():
    # two objects of a like kind (one set of features everywhere): class 0's evidence on the left, class 1's
    # on the right; alone, class 0's spread covers both; beside class 1 it keeps to where it is not outdone
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, :, :4] = torch.linspace(1.0, 0.5, 4)
    maps[0, 1, :, 4:] = 1.0
    features = torch.ones(1, 2, 8, 8)
    inside = torch.ones(1, 8, 8, dtype=torch.bool)
    alone = semantic_spread(maps[:, :1], features, inside)[0, 0]
    rivals = semantic_spread(maps, features, inside)[0]
    assert alone[:, 4:].min() > 0.3  # the spread reaches the other object
    assert rivals[0, :, 4:].max() == 0  # where class 1 holds evidence and class 0 none, class 0 gets nothing
    torch.testing.assert_close(rivals[0, :, :4], alone[:, :4])  # where it is not outdone, as alone
    # the same two maps as two sets of one (one class at two sets of scales) do not compete
    torch.testing.assert_close(semantic_spread(maps, features, inside, set_size=1)[0, 0], alone)
    # duplicates of one map never outdo each other
    twice = semantic_spread(maps[:, [0, 0]], features, inside)[0]
    torch.testing.assert_close(twice[0], alone)
    torch.testing.assert_close(twice[1], alone)


def test_an_instance_grows_from_its_seed_down_to_the_extent_threshold():
    work = torch.zeros(1, 1, 16, 32)
    work[0, 0, 4:8, 4:8] = 1.0  # seed
    work[0, 0, 4:8, 8:14] = 0.35  # the object's weaker part, joined to the seed
    work[0, 0, 4:8, 20:28] = 0.35  # as weak, but holds no seed: not an object
    args = (torch.tensor([[3]]), torch.ones(1, 1), torch.tensor([[64, 128]]), (64, 128), [(64, 128)])
    rule = BoxRule(threshold=0.45, mask_threshold=0.3, grow=0.3)
    (grown,) = labels_from_work(work, *args, rule=rule)
    # cells 4..13 of stride 4; the last pixel column samples the map halfway to the 0 beyond: below 0.3
    assert [p.bbox for p in grown] == [[16.0, 16.0, 39.0, 16.0]]
    (seed_only,) = labels_from_work(work, *args, rule=replace(rule, grow=None, mask_threshold=0.45))
    assert [p.bbox for p in seed_only] == [[16.0, 16.0, 16.0, 16.0]]


def test_a_large_object_is_one_instance_not_its_parts():
    # fine maps see two telling parts of one large object (a head and a tail); the coarse maps of the
    # smaller scales see the object whole
    fine = torch.zeros(1, 1, 32, 32)
    fine[0, 0, 6:12, 4:10] = 1.0
    fine[0, 0, 20:26, 22:28] = 0.9
    coarse = torch.zeros(1, 1, 32, 32)
    coarse[0, 0, 4:28, 2:30] = 0.5
    coarse[0, 0, 8:20, 6:20] = 1.0
    args = (torch.tensor([[3]]), torch.ones(1, 1), torch.tensor([[128, 128]]), (128, 128), [(128, 128)])
    rule = RULES["instances"]
    (parts,) = labels_from_work(fine, *args, rule=rule)
    assert len(parts) == 2  # fine maps alone: the parts
    (whole,) = labels_from_work(fine, *args, rule=rule, coarse=coarse)
    # cells 2..29 x 4..27 of stride 4, less the edge pixel each side that samples the map halfway to 0
    assert [p.bbox for p in whole] == [[9.0, 17.0, 110.0, 94.0]]
    # a small object's coarse map stays small: its fine maps decide
    small = torch.zeros(1, 1, 32, 32)
    small[0, 0, 4:10, 2:8] = 1.0
    (fine_kept,) = labels_from_work(fine, *args, rule=rule, coarse=small)
    assert [p.bbox for p in fine_kept] == [p.bbox for p in parts]


def test_a_class_takes_its_coarse_extent_when_any_coarse_instance_is_large():
    # a bird: the fine maps see only its head; the coarse maps see its body whole (a box of 47% of the
    # image) and, brighter, a foot apart from it, which ranks first among the coarse instances
    fine = torch.zeros(1, 1, 32, 32)
    fine[0, 0, 6:10, 6:10] = 1.0
    coarse = torch.zeros(1, 1, 32, 32)
    coarse[0, 0, 4:26, 4:26] = 0.6
    coarse[0, 0, 28:31, 28:31] = 1.0
    args = (torch.tensor([[3]]), torch.ones(1, 1), torch.tensor([[128, 128]]), (128, 128), [(128, 128)])
    found = labels_from_work(fine, *args, rule=RULES["instances"], coarse=coarse)[0]
    best = max(found, key=lambda p: p.score)
    # cells 4..25 of stride 4, less the edge pixel each side that samples the map halfway to 0
    assert best.bbox == [17.0, 17.0, 86.0, 86.0]
    assert len(found) == 2  # the body and the foot: both coarse instances, no fine one (the head)


def test_the_extent_is_chosen_by_any_large_coarse_instance_and_parts_by_the_best_scored_one():
    # one image, one class: components 0-1 on its fine map (owner 0), 2-3 on its coarse map (owner 1), in
    # the order `_select` keeps them (by peak); cells: each map's image area; returns whether the class takes
    # its coarse instances
    owner = torch.tensor([0, 0, 1, 1])
    cells = torch.tensor([10000.0, 10000.0])
    fine_parts = [[10, 10, 20, 20], [40, 40, 50, 50]]

    def coarse_taken(coarse_boxes, confidence):
        box = torch.tensor(fine_parts + coarse_boxes, dtype=torch.float)
        top = boxes._tops(owner, torch.tensor(confidence))
        return boxes._large_objects(torch.arange(4), top, owner, box, cells, 0.4, 1, 1).tolist()

    # a bright speck ranks first and scores best; the other coarse instance covers 49% of the image
    assert coarse_taken([[80, 80, 90, 90], [0, 0, 70, 70]], [0.9, 0.5, 0.8, 0.3]) == [True]
    # no coarse instance is large, and the speck holds no part: the fine instances stay
    assert coarse_taken([[80, 80, 90, 90], [5, 5, 55, 55]], [0.9, 0.5, 0.8, 0.3]) == [False]
    # the same boxes, but the instance holding both parts scores best (the speck only ranks first by peak):
    # the parts are one object's
    assert coarse_taken([[80, 80, 90, 90], [5, 5, 55, 55]], [0.9, 0.5, 0.1, 0.3]) == [True]


def test_agreement_is_the_iou_of_a_class_top_boxes_on_its_two_extents():
    # one image, three classes: maps 0-2 fine, 3-5 coarse. Class 0's top boxes overlap by half of their union,
    # class 1's lie apart, class 2 has no coarse instance; each class's two maps get its value
    box = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 30], [0, 0, 5, 5], [0, 0, 10, 10]],
                       dtype=torch.float)
    top_box = torch.zeros(6, 4)
    top_box[[0, 3, 1, 4, 2]] = box
    has_top = torch.tensor([True, True, True, True, True, False])
    assert boxes._agreement(top_box, has_top, 1, 3).tolist() == [0.5, 0.0, 0.0, 0.5, 0.0, 0.0]
    # two images of one class: the maps are per image, fine then coarse
    two = boxes._agreement(box[[0, 1, 2, 2]], torch.ones(4, dtype=torch.bool), 2, 1)
    assert two.tolist() == [0.5, 0.5, 1.0, 1.0]


def test_top_boxes_are_each_map_top_instance_mask_box():
    # two maps: map 0's top instance (component 1) has a dim rim below its mask threshold; map 1 has none
    maps = torch.zeros(2, 8, 8)
    maps[0, 1:6, 1:6] = 0.35
    maps[0, 2:5, 2:4] = 1.0
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, 1:6, 1:6] = 1
    top_box, has_top = boxes._top_boxes(maps, labels, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]),
                                        torch.tensor([0]))
    assert has_top.tolist() == [True, False]
    assert top_box[0].tolist() == [2.0, 2.0, 4.0, 5.0]  # the mask's cells 2..3 x 2..4, as corners
    assert top_box[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    # a top instance whose every pixel lies under its mask threshold has no box to agree on or judge
    _, has_top = boxes._top_boxes(maps, labels, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.5]),
                                  torch.tensor([0]))
    assert has_top.tolist() == [False, False]


def test_a_box_both_extents_agree_on_outscores_one_they_do_not():
    # two images of one class, each object equally bright on the fine maps: in image 0 the coarse map puts its
    # object in the same place, in image 1 elsewhere (a large object's context), and there the class keeps its
    # fine instance (the coarse one is no large object)
    fine = torch.zeros(2, 1, 32, 32)
    fine[:, 0, 8:16, 8:16] = 1.0
    coarse = torch.zeros(2, 1, 32, 32)
    coarse[0, 0, 8:16, 8:16] = 1.0
    coarse[1, 0, 20:28, 20:28] = 1.0
    args = (torch.tensor([[3], [3]]), torch.ones(2, 1), torch.tensor([[128, 128]] * 2), (128, 128), [(128, 128)] * 2)
    agreed, apart = labels_from_work(fine, *args, rule=RULES["instances"], coarse=coarse)
    assert [p.bbox for p in agreed] == [p.bbox for p in apart]  # the same fine box in both
    assert len(apart) == 1 and apart[0].score == pytest.approx(agreed[0].score / 2)


def test_a_judge_asked_of_a_class_taking_its_coarse_extent_can_keep_it_on_its_fine_box():
    # two images x two class slots: image 0's second class is the large object above (its first slot an
    # empty map), image 1's one class a small object. Only the large object's class is about to take its
    # coarse extent, so only it is asked about, with its top fine box: that of its mask (above 0.5), in
    # working cells. A judge that says the fine box holds the object keeps the class there.
    fine = torch.zeros(2, 2, 32, 32)
    fine[0, 1, 6:12, 4:10] = 1.0
    fine[0, 1, 20:26, 22:28] = 0.9
    fine[1, 0, 4:10, 2:8] = 1.0
    coarse = torch.zeros(2, 2, 32, 32)
    coarse[0, 1, 4:28, 2:30] = 0.5
    coarse[0, 1, 8:20, 6:20] = 1.0
    coarse[1, 0] = fine[1, 0]
    args = (torch.tensor([[5, 3], [7, -1]]), torch.ones(2, 2), torch.tensor([[128, 128]] * 2), (128, 128),
            [(128, 128)] * 2)
    asked = []

    def judge(answer: bool):
        def ask(images, classes, fine_boxes):
            asked.append((images.tolist(), classes.tolist(), fine_boxes.tolist()))
            return torch.full((len(images),), answer)
        return ask

    plain = labels_from_work(fine, *args, rule=RULES["instances"], coarse=coarse)
    parts = labels_from_work(fine, *args, rule=replace(RULES["instances"], large=None))
    assert len(plain[0]) == 1 and len(parts[0]) == 2  # the whole object from the coarse maps, or its parts
    held = labels_from_work(fine, *args, rule=RULES["instances"], coarse=coarse, judge=judge(True))
    assert asked == [([0], [3], [[4.0, 6.0, 10.0, 12.0]])]
    assert [[p.bbox for p in found] for found in held] == [[p.bbox for p in found] for found in parts]
    context = labels_from_work(fine, *args, rule=RULES["instances"], coarse=coarse, judge=judge(False))
    assert [[p.bbox for p in found] for found in context] == [[p.bbox for p in found] for found in plain]


def test_a_wide_components_mask_reaches_lower_than_a_narrow_ones():
    # two objects of one class, each with a rim at 0.47: between the wide mask threshold (0.45) and the
    # mask threshold (0.5); only the object whose box covers over 15% of the image keeps its rim
    work = torch.zeros(1, 1, 32, 32)
    work[0, 0, 4:16, 4:16] = 1.0
    work[0, 0, 4:16, 16:18] = 0.47  # box of 12 x 14 cells: 16% of the image's 1024
    work[0, 0, 22:26, 22:26] = 1.0
    work[0, 0, 22:26, 26:28] = 0.47
    args = (torch.tensor([[3]]), torch.ones(1, 1), torch.tensor([[128, 128]]), (128, 128), [(128, 128)])
    rule = replace(RULES["instances"], large=None)
    assert rule.mask_threshold - rule.wide_drop == 0.45 and rule.wide_share == 0.15
    found = sorted(labels_from_work(work, *args, rule=rule)[0], key=lambda p: p.bbox[0])
    plain = sorted(labels_from_work(work, *args, rule=replace(rule, wide_drop=0.0))[0],
                   key=lambda p: p.bbox[0])
    assert [len(found), len(plain)] == [2, 2]
    assert found[0].bbox[2] >= plain[0].bbox[2] + 4  # the wide object's rim (the outer pixels sample 0 beyond)
    assert found[0].area > plain[0].area
    assert found[1].bbox == plain[1].bbox and found[1].area == plain[1].area  # the narrow one's: not


def test_a_mask_and_its_box_leave_out_where_another_class_is_stronger():
    """Class 3's map reaches over class 5's object, weaker there than class 5's by more than the rival margin
    (0.2 > 0.1): its mask keeps only its own pixels, and its box is that mask's. Within the margin, and for
    the paper's rule, masks keep every pixel; a lone class's mask is never cut."""
    work = torch.zeros(1, 2, 32, 32)
    work[0, 0, 4:28, 4:28] = 0.8  # class 3's object (cells 4-19) and its map over class 5's, beside it
    work[0, 1, 4:28, 20:28] = 1.0  # class 5's object
    args = (torch.tensor([[3, 5]]), torch.ones(1, 2), torch.tensor([[128, 128]]), (128, 128), [(128, 128)])
    rule = replace(RULES["instances"], large=None)
    mine, other = sorted(labels_from_work(work, *args, rule=rule)[0], key=lambda p: p.class_index)
    whole = min(labels_from_work(work, *args, rule=replace(rule, rival_margin=0.5))[0], key=lambda p: p.class_index)
    assert whole.bbox == [16.0, 16.0, 96.0, 96.0]  # the whole component, over class 5's object
    inside, uncut = mask_utils.decode(mine.rle), mask_utils.decode(whole.rle)
    assert (inside[:, :80] == uncut[:, :80]).all() and inside[:, 80:].sum() == 0 < uncut[:, 80:].sum()
    assert mine.bbox == [16.0, 16.0, 64.0, 96.0]  # the mask's box
    assert other.bbox == [80.0, 16.0, 32.0, 96.0]
    (paper,) = [p for p in labels_from_work(work, *args, rule=PAPER_RULE)[0] if p.class_index == 3]
    assert paper.area >= whole.area  # every pixel above 20% of the max, class 5's object too
    (alone,) = labels_from_work(work[:, :1], torch.tensor([[3]]), torch.ones(1, 1), *args[2:], rule=rule)[0]
    assert alone.area == whole.area


def test_a_mask_holds_where_its_map_dips_inside_it_but_not_where_another_class_is_in_front():
    """A dip under the mask threshold (0.35 < 0.5, above the extent) enclosed by the object is in its mask; the same
    dip open to the object's outline (a bay) is not; an enclosed object of another class, stronger there, stays
    out. Filling changes no box."""
    work = torch.zeros(1, 2, 32, 32)
    work[0, 0, 4:20, 4:20] = 1.0
    work[0, 0, 8:12, 8:12] = 0.35  # a dip inside the first object
    work[0, 0, 22:30, 4:20] = 1.0
    work[0, 0, 24:30, 8:12] = 0.35  # a bay of the second, open at its bottom edge
    work[0, 0, 4:20, 22:30] = 0.8  # the third, with an object of class 5 in front of its middle
    work[0, 1, 10:14, 24:28] = 1.0
    args = (torch.tensor([[3, 5]]), torch.ones(1, 2), torch.tensor([[128, 128]]), (128, 128), [(128, 128)])
    found = labels_from_work(work, *args, rule=replace(RULES["instances"], large=None))[0]
    by_corner = {tuple(p.bbox[:2]): p for p in found if p.class_index == 3}
    dipped, bayed, behind = by_corner[16.0, 16.0], by_corner[16.0, 88.0], by_corner[88.0, 16.0]
    assert dipped.bbox == [16.0, 16.0, 64.0, 64.0] and mask_utils.decode(dipped.rle)[32:48, 32:48].all()
    assert mask_utils.decode(bayed.rle)[100:116, 36:44].sum() == 0  # the bay's pixels, well inside it
    assert bayed.bbox == [16.0, 88.0, 64.0, 32.0]
    hole = mask_utils.decode(behind.rle)[42:54, 98:110]  # class 5's object, well inside its cells
    assert hole.sum() == 0 and behind.bbox == [88.0, 16.0, 32.0, 64.0]
    assert boxes.enclosed(torch.tensor([[[1, 1, 1], [1, 0, 1], [1, 1, 1]], [[1, 1, 1], [1, 0, 0], [1, 1, 1]]]).bool()
                          ).tolist() == [[[False] * 3, [False, True, False], [False] * 3], [[False] * 3] * 3]


def held_by_one_coarse_instance() -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(fine maps, coarse maps, the rest of `pseudo_labels`' arguments) of one class in a 256-pixel image: three
    fine instances, the first two held by the coarse map's one instance (0.22 of the image), the third apart."""
    fine = torch.zeros(1, 1, 64, 64)
    fine[0, 0, 10:16, 10:16] = 1.0
    fine[0, 0, 30:36, 30:36] = 0.9
    fine[0, 0, 50:56, 50:56] = 0.8
    coarse = torch.zeros(1, 1, 64, 64)
    coarse[0, 0, 8:38, 8:38] = 1.0  # 900 of 4096 cells
    return fine, coarse, (torch.tensor([[3]]), torch.ones(1, 1), torch.tensor([[256, 256]]), (256, 256), [(256, 256)])


def test_fine_instances_held_by_one_coarse_instance_are_its_parts():
    # a mid-sized object (a fifth of the image): the fine maps split it into two parts, the coarse map
    # holds both in one instance, so the class takes the coarse instance although it is not "large" (the
    # third fine instance is a second, separate object of the class)
    fine, coarse, args = held_by_one_coarse_instance()
    (found,) = labels_from_work(fine, *args, rule=RULES["instances"], coarse=coarse)
    assert [p.bbox[:2] for p in found] == [[32.0, 32.0]]  # the whole object, from the coarse map
    one_part = fine.clone()
    one_part[0, 0, 30:36, 30:36] = 0
    (kept,) = labels_from_work(one_part, *args, rule=RULES["instances"], coarse=coarse)
    assert len(kept) == 2 and sorted(p.bbox[0] for p in kept) == [40.0, 200.0]  # one part only: fine maps


def test_held_fine_instances_that_look_alike_are_two_objects_not_parts():
    # the maps above: the coarse instance holds the first two fine instances. Where the classifier's
    # features (stride 16: a cell is 4 of the grid's) see the same thing in both boxes, they are two objects
    # of the class side by side and the fine instances stay; where they see different things, parts
    fine, coarse, args = held_by_one_coarse_instance()
    features = torch.rand(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    features[0, :, 2:4, 2:4] = torch.tensor([1.0, 2, 0, 0, 1, 0, 0, 0])[:, None, None]  # the first box's cells
    features[0, :, 7:9, 7:9] = torch.tensor([1.0, 2, 0, 0, 0, 0, 0, 0])[:, None, None]  # the second's: cosine 0.91
    rule = RULES["instances"]
    (alike,) = labels_from_work(fine, *args, rule=rule, coarse=coarse, features=features)
    assert sorted(p.bbox[0] for p in alike) == [40.0, 120.0, 200.0]  # every fine instance
    # the same features against a stricter rule: not alike enough, parts
    (strict,) = labels_from_work(fine, *args, rule=replace(rule, alike=0.95), coarse=coarse, features=features)
    assert [p.bbox[:2] for p in strict] == [[32.0, 32.0]]
    features[0, :, 7:9, 7:9] = torch.tensor([0.0, 0, 3, 1, 0, 0, 0, 0])[:, None, None]  # cosine 0
    (unlike,) = labels_from_work(fine, *args, rule=rule, coarse=coarse, features=features)
    assert [p.bbox[:2] for p in unlike] == [[32.0, 32.0]]  # the whole object, as without features


def test_a_boxs_look_is_its_features_summed_over_the_cells_it_touches():
    features = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([[0.0, 0.0, 28.0, 24.0], [5.0, 9.0, 6.0, 10.0], [13.0, 2.0, 27.0, 23.0]])  # grid cells
    image = torch.tensor([0, 1, 1])
    looks = boxes._looks(features, image, box, width=28)  # the grid is 4 times finer
    spans = [(0, 6, 0, 7), (2, 3, 1, 2), (0, 6, 3, 7)]  # feature rows y1:y2, columns x1:x2
    expected = torch.stack([features[i, :, y1:y2, x1:x2].sum((1, 2))
                            for i, (y1, y2, x1, x2) in zip(image, spans, strict=True)])
    torch.testing.assert_close(looks, torch.nn.functional.normalize(expected, dim=1))


def test_masks_in_chunks_equal_masks_all_at_once(monkeypatch):
    """A photo too large for MASK_BUDGET goes a few instances at a time; the masks do not change."""
    from camlabel.workers import boxes

    torch.manual_seed(0)
    maps, labels = torch.rand(3, 16, 24), torch.randint(0, 4, (3, 16, 24))
    args = (maps, labels, [60, 90], (64, 96), (150, 220), [0, 2, 1], torch.tensor([1, 2, 3]),
            torch.tensor([0.3, 0.5, 0.7]))
    whole = list(boxes.masks_at_original_size(*args))
    monkeypatch.setattr(boxes, "MASK_BUDGET", 150 * 220)  # one instance at a time
    chunks = list(boxes.masks_at_original_size(*args))
    assert len(whole) == 1 and len(chunks) == 3
    for i in (0, 1):
        torch.testing.assert_close(torch.cat([c[i] for c in chunks]), whole[0][i])
    assert whole[0][1].any() and not whole[0][1].all()  # real masks


def test_a_batch_of_small_photos_reaches_the_host_together_and_a_huge_one_chunk_by_chunk(monkeypatch):
    """Masks go to the host in one copy for all the images that fit MASK_BUDGET (one sync, not two an
    image on a GPU); a photo too large for it goes a chunk at a time. The labels are the same either way."""
    work = torch.zeros(3, 2, 32, 48)
    for i in range(3):
        work[i, 0, 4 + i : 12 + i, 6:20] = 1.0  # two objects an image, of two classes
        work[i, 1, 18:26, 24 + 2 * i : 40] = 0.8
    args = (torch.tensor([[3, 5]] * 3), torch.ones(3, 2), torch.tensor([[128, 192]] * 3), (128, 192),
            [(120, 180), (97, 140), (128, 192)])
    encoded = []
    encode = boxes._encode
    monkeypatch.setattr(boxes, "_encode", lambda pending, results: encoded.append(
        sorted((s.image, len(s.class_indices)) for s in pending)) or encode(pending, results))
    together = labels_from_work(work, *args, rule=replace(RULES["instances"], large=None))
    assert [e for e in encoded if e] == [[(0, 2), (1, 2), (2, 2)]]  # every image's masks in one copy
    # instance-pixels: image 0 2 x 21600, image 1 2 x 13580, image 2 2 x 24576
    for budget, copies in [(43200 + 27160, [[(0, 2), (1, 2)], [(2, 2)]]),  # images 0 and 1 fit together
                           (30000, [[(0, 1)], [(0, 1)], [(1, 2)], [(2, 1)], [(2, 1)]])]:  # 0 and 2 are huge
        encoded.clear()
        monkeypatch.setattr(boxes, "MASK_BUDGET", budget)
        apart = labels_from_work(work, *args, rule=replace(RULES["instances"], large=None))
        assert [e for e in encoded if e] == copies
        assert [[(p.class_index, p.bbox, p.area, p.rle) for p in found] for found in together] == \
            [[(p.class_index, p.bbox, p.area, p.rle) for p in found] for found in apart]
    assert all(len(found) == 2 for found in together)


def test_areas_past_float32s_exact_integers_stay_exact():
    mask = torch.ones(1, 4097, 4097, dtype=torch.bool)  # 16,785,409 pixels: odd, past 2^24
    results = [[]]
    boxes._encode([boxes.Sampled(0, mask, mask, [3], [0.5])], results)
    (label,) = results[0]
    assert label.area == 4097 * 4097 and label.bbox == [0.0, 0.0, 4097.0, 4097.0]
    assert mask_utils.area(label.rle | {"counts": label.rle["counts"].encode()}) == 4097 * 4097
