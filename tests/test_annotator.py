"""The annotator on real photos: shape groups, batch independence, labels vs predicted classes."""

import torch
import torch.nn.functional as F
from skimage import data

from workers.annotator import AnnotateSettings, Annotator, shape_groups
from workers.models import load_model


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
    assert all(p.class_index in predicted.top_classes[0].tolist() for p in predicted.labels[0])
    assert predicted.labels[0], "the top predicted class of a clear cat photo gets a box"
    box = predicted.labels[0][0].bbox
    assert box[2] * box[3] > 0.05 * 240 * 320  # the cat fills much of the photo
