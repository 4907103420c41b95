"""What the classifier sees in crops: without labels it names regions by them (one box per object); with labels
it scores each box by them."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.annotator import Annotator
from camlabel.workers.models import load_model
from camlabel.workers.preprocess import IMAGENET_MEAN, IMAGENET_STD
from camlabel.workers.regions import (
    CROP_CONTEXT,
    CROP_SIZE,
    SURE,
    fine_box_holds,
    folded_into,
    name_regions,
    one_box_per_object,
)
from skimage import data
from torch import nn
from torchvision.transforms.functional import resized_crop

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_a_region_is_named_by_what_its_crop_shows():
    # "logits" = the crop's mean colour: a box on the red half must be named red, on the blue half blue,
    # whatever the whole image is
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batch = torch.zeros(2, 3, 64, 128)
    batch[0, 0, :, :64] = 5
    batch[0, 2, :, 64:] = 5
    batch[1, 1] = 5  # all green
    boxes = torch.tensor([[8.0, 16, 40, 48], [80, 8, 120, 56], [80, 8, 120, 56]])
    probs = name_regions(model, batch, boxes, torch.tensor([0, 0, 1]))
    assert probs.shape == (3, 3)
    assert probs.argmax(1).tolist() == [0, 2, 1]


def test_a_crop_is_square_around_the_region_with_context():
    ramp = torch.arange(128.0).expand(1, 1, 64, 128).clone()  # value = x coordinate
    crop = name_regions(nn.Flatten(), ramp, torch.tensor([[40.0, 20, 80, 40]]), torch.tensor([0]))  # the crop itself
    # the region is 40 wide: the crop spans 40 x CROP_CONTEXT pixels centred on x = 60
    values = crop.log()  # softmax undone up to a constant
    row = values.view(CROP_SIZE, CROP_SIZE)[CROP_SIZE // 2]
    span = (row[-1] - row[0]) * CROP_SIZE / (CROP_SIZE - 1)
    assert abs(float(span) - 40 * CROP_CONTEXT) < 1


def test_a_box_holds_its_object_when_it_alone_keeps_the_class_as_surely_as_the_whole_image():
    # class 0's logit = 64 x (mean of channel 0) - 2: an object of 8 x 8 ones in 32 x 32 gives logit 2,
    # probability 0.88 (sure); the object at half strength gives 0.5 (not sure, never judged)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].weight[0, 0] = 64.0
        model[2].bias.copy_(torch.tensor([-2.0, 0.0]))
    small = torch.zeros(2, 3, 32, 32)
    small[0, 0, 8:16, 8:16] = 1.0
    small[1, 0, 8:16, 8:16] = 0.5
    small[0, 1] = 3.0  # background in another channel: the class does not see it
    assert torch.sigmoid(torch.tensor(2.0)) >= SURE > 0.5
    whole, half, around = [8.0, 8, 16, 16], [8.0, 8, 12, 16], [4.0, 4, 20, 20]
    seen = []
    holds = fine_box_holds(lambda x: seen.append(len(x)) or model(x), small, torch.tensor([0, 0, 0, 1]),
                           torch.tensor([0, 0, 0, 0]), torch.tensor([whole, half, around, whole]))
    # the object alone, or with a margin of background, keeps all it had; half of it, probability 0.5
    assert holds.tolist() == [True, False, True, False]
    assert seen == [2, 3]  # each of the two images once, then the sure class's three boxes alone
    seen.clear()
    doubted = fine_box_holds(lambda x: seen.append(len(x)) or model(x), small, torch.tensor([1]),
                             torch.tensor([0]), torch.tensor([whole]))
    assert doubted.tolist() == [False] and seen == [1]  # no box is shown alone where no class is sure


def test_boxes_of_one_object_keep_only_the_best_whatever_their_class():
    boxes = torch.tensor([[10.0, 10, 110, 90],  # tabby, the cat
                          [12.0, 8, 108, 92],  # tiger cat, the same cat
                          [14.0, 12, 112, 88],  # Egyptian cat, the same cat
                          [30.0, 20, 60, 50],  # tabby, the cat's head: a part
                          [150.0, 10, 190, 50],  # another object
                          [10.0, 10, 110, 90],  # the same place in another image
                          [100.0, 40, 160, 80],  # an object beside the cat, overlapping it a little
                          [70.0, 60, 90, 80]])  # a mouse inside the cat's box: another class, kept
    scores = torch.tensor([0.5, 0.7, 0.4, 0.45, 0.3, 0.2, 0.35, 0.25])
    classes = torch.tensor([281, 282, 285, 282, 504, 281, 700, 673])
    owners = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0])
    keep = one_box_per_object(boxes, scores, classes, owners)
    assert keep.tolist() == [1, 6, 4, 7, 5]
    # the tabby and Egyptian cat boxes were folded into the tiger cat's; the head (a part, overlapping it by
    # less than SAME_OBJECT_IOU), the same place in another image and the kept boxes into none
    assert folded_into(boxes, keep, owners).tolist() == [1, -1, 1, -1, -1, -1, -1, -1]


def photo(name: str, height: int, width: int) -> torch.Tensor:
    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float()
    return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True)[0].round().byte()


def test_without_labels_one_cat_gets_one_box_named_by_its_crop():
    loaded = load_model(device="cpu")
    annotator = Annotator(loaded, AnnotateSettings(input_size=224, scales=(1.0,), flip=False))
    cat = photo("chelsea", 300, 451)
    result = annotator([cat])
    found = result.labels[0]
    assert len(found) == 1, [(p.class_index, p.bbox) for p in found]  # synonyms and parts merged
    label = found[0]
    assert label.class_index in CATS
    # the look names it: its best region's class is that region's crop's own best class (classify the
    # same square crop independently)
    region = annotator.look.regions([cat], [(300, 451)])[0][0][0]
    assert region.class_index == label.class_index
    probs = crop_probabilities(loaded.model, cat, region.bbox)
    assert probs.argmax().item() == region.class_index
    # its score = localisation confidence (at most 1) x the crop's probability (resampled a little differently)
    assert region.score <= probs.max().item() * 1.05
    # the named class is then mapped as a labelled one: the same box, its score x how surely it was named
    # (a labelled class's instances are scored by their crops instead: that factor taken out here)
    group = annotator.work([cat], [[label.class_index]])[0]
    labelled = replace(group, namer=None).labels(annotator.rule)[0][0]
    assert labelled.bbox == label.bbox and labelled.rle == label.rle
    assert label.score == pytest.approx(labelled.score * region.score, rel=1e-5)


def crop_probabilities(model, image, bbox) -> torch.Tensor:
    """The classifier's probabilities [classes] for the square crop around COCO box `bbox` of uint8 `image`
    [3,H,W] at its own size, CROP_CONTEXT times its longer side, made independently of the annotator's."""
    x, y, w, h = bbox
    side = max(w, h) * CROP_CONTEXT
    normalised = (image.float()[None] / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD)[:, None, None]  # outside the photo a crop sees 0, the dataset mean, as the annotator's does
    crop = resized_crop(normalised, round(y + h / 2 - side / 2), round(x + w / 2 - side / 2), round(side),
                        round(side), [CROP_SIZE, CROP_SIZE], antialias=True)
    with torch.no_grad():
        return model(crop).softmax(1)[0]


def test_a_labelled_class_instances_are_scored_by_what_their_crops_show():
    """With labels, each instance's score is its localisation confidence times the square root of the probability
    its crop gives its class: a wrong label's boxes (a toilet tissue on the cat) rank far below the cat's."""
    loaded = load_model(device="cpu")
    annotator = Annotator(loaded, AnnotateSettings(input_size=224, scales=(1.0,), flip=False, precision="float32"))
    cat = photo("chelsea", 300, 451)
    group = annotator.work([cat], [[281, 999]])[0]
    scored = group.labels(annotator.rule)[0]
    unscored = replace(group, namer=None).labels(annotator.rule)[0]
    assert [(p.class_index, p.bbox) for p in scored] == [(p.class_index, p.bbox) for p in unscored]
    assert {p.class_index for p in scored} == {281, 999}  # the wrong label still gets its boxes, ranked low
    for mine, plain in zip(scored, unscored, strict=True):
        shown = crop_probabilities(loaded.model, cat, plain.bbox)[plain.class_index].item()
        assert mine.score == pytest.approx(plain.score * shown**0.5, rel=0.05, abs=1e-3)  # crops resampled apart
    best = {c: max(p.score for p in scored if p.class_index == c) for c in (281, 999)}
    assert best[999] < 0.1 * best[281]
    # the paper's rule, a baseline, keeps the scores it had
    paper = Annotator(loaded, replace(annotator.settings, rule="paper"))
    group = paper.work([cat], [[281, 999]])[0]
    assert group.labels(paper.rule) == replace(group, namer=None).labels(paper.rule)
