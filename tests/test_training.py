"""The GAP localizer and its GGAM loss against the math; training on planted objects; the trained model
used by the annotate job; the HTML report rendered in headless Chromium."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import ray
import torch
import torch.nn.functional as F
from camlabel.pipeline import report
from camlabel.pipeline.cli import main
from camlabel.pipeline.sources import SourceError
from camlabel.pipeline.train import TrainConfig, _as_user_error, labelled_images, train
from camlabel.schemas.config import ConfigError, load_config
from camlabel.workers.heatmaps import compute_heatmaps
from camlabel.workers.localizer import GapLocalizer, localizer_loss, symmetric_kl
from camlabel.workers.models import ModelError, load_model
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from tests.conftest import CLASSES, SIZE, planted


def tiny_localizer(attention: bool) -> GapLocalizer:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    return GapLocalizer(trunk, 8, num_classes=5, width=32, attention=attention)


def test_symmetric_kl_on_a_hand_computed_pair():
    # p = (1/4, 3/4), q = (1/2, 1/2): KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2); KL(q||p) = 1/2 ln 2 + 1/2 ln(2/3)
    by_hand = (0.25 * math.log(0.5) + 0.75 * math.log(1.5) + 0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2
    assert symmetric_kl(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(by_hand)
    assert symmetric_kl(torch.tensor([[2.0, 5.0]]), torch.tensor([[4.0, 10.0]])).item() == pytest.approx(0, abs=1e-7)


def test_ggam_loss_is_cross_entropy_plus_lambda_times_symmetric_kl_to_the_gradcam_weights():
    model = tiny_localizer(attention=True)
    images = torch.randn(3, 3, 64, 48)
    targets = torch.zeros(3, 5)
    targets[0, 1], targets[1, 2], targets[2, [0, 4]] = 1.0, 1.0, 0.5
    loss, logits = localizer_loss(model, images, targets, ggam=0.7)

    attended, s = model.attention.weighted(model.conv(model.trunk(images)))
    h, w = attended.shape[-2:]
    # For GAP + linear, d(sum of labelled logits)/d(attended features) is sum_c w_c / (h w) at every position.
    beta = (targets > 0).float() @ model.classifier.weight / (h * w)
    p = s / s.sum(1, keepdim=True)
    q = torch.sigmoid(beta) / torch.sigmoid(beta).sum(1, keepdim=True)
    kl = ((p * (p / q).log()).sum(1) + (q * (q / p).log()).sum(1)) / 2
    expected = F.cross_entropy(model.classifier(attended.mean((2, 3))), targets) + 0.7 * kl.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert localizer_loss(model, images, targets, ggam=0.0)[0].item() == pytest.approx(
        F.cross_entropy(logits, targets).item(), rel=1e-6)
    with pytest.raises(ValueError, match="attention"):
        localizer_loss(tiny_localizer(attention=False), images, targets, ggam=1.0)


@pytest.mark.parametrize("attention", [False, True])
def test_the_engine_cam_of_a_localizer_is_the_papers_sum(attention):
    model = tiny_localizer(attention).eval()
    images = torch.randn(2, 3, 64, 64)
    maps = compute_heatmaps(model, images, target_layer="attention", method="cam", targets=torch.tensor([[3], [1]]))
    with torch.no_grad():
        features = model.attention(model.conv(model.trunk(images)))
        by_hand = torch.einsum("bc,bchw->bhw", model.classifier.weight[[3, 1]], features).clamp(min=0)
    by_hand = by_hand / by_hand.flatten(1).amax(1)[:, None, None].clamp(min=1e-7)
    assert torch.allclose(maps.maps[:, 0], by_hand, atol=1e-5)


def test_training_on_planted_objects_learns_and_its_cam_lands_on_them(trained):
    root, spec = trained
    history = spec["history"]
    assert spec["classes"] == list(CLASSES)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_loss"] < 0.5 * math.log(2)  # well below chance for two classes
    loaded = load_model(model_dir=root / "model", device="cpu")
    assert (loaded.name, loaded.target_layer) == ("localizer:mobilenet_v2", "attention")
    assert loaded.class_names == ["disc", "square"]

    test = planted(root / "test", 24, seed=2)  # images the model never saw
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p, _, _, _ in test])
    x = F.interpolate(images.float() / 255, size=(2 * SIZE, 2 * SIZE), mode="bilinear")
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    targets = torch.tensor([[CLASSES.index(c)] for _, c, _, _ in test])
    heat = compute_heatmaps(loaded.model, x.contiguous(memory_format=torch.channels_last),
                            target_layer=loaded.target_layer, method="cam", targets=targets)
    maps = F.interpolate(heat.maps, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    peaks = maps.flatten(1).argmax(1)
    hits = [x0 <= int(p) % SIZE < x1 and y0 <= int(p) // SIZE < y1
            for p, (_, _, (x0, y0, x1, y1), _) in zip(peaks, test, strict=True)]
    chance = sum((x1 - x0) * (y1 - y0) for _, _, (x0, y0, x1, y1), _ in test) / (len(test) * SIZE * SIZE)
    assert chance < 0.13
    assert sum(hits) / len(test) >= 0.75, (sum(hits), len(test))
    with torch.no_grad():  # classified at the size it was trained at
        native = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        predicted = loaded.model(native.contiguous(memory_format=torch.channels_last)).argmax(1)
    assert (predicted == targets[:, 0]).float().mean() >= 0.9


def test_annotate_uses_the_model_dir_and_the_report_renders(trained, tmp_path, capsys):
    root, _ = trained
    source = tmp_path / "source"
    source.mkdir()
    for i, path in enumerate(sorted((root / "train" / "disc").glob("*.png"))[:3]):
        shutil.copy(path, source / f"{i}.png")
    hostile = '"><img src=x onerror=alert(1)> #1?.png'  # '#' and '?' would cut a link to a file named after it
    shutil.copy(root / "train" / "square" / "001.png", source / hostile)
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert main(["annotate", str(source), "--out", str(tmp_path / "run"), "--model-dir", str(root / "model"),
                     "--input-size", str(SIZE), "--no-flip", "--scales", "1.0", "--top-k", "1"]) == 0
    finally:
        ray.shutdown()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "localizer:mobilenet_v2"
    assert manifest["counts"] == {**manifest["counts"], "inputs": 5, "annotated": 4, "errors": 1}
    assert main(["export-coco", str(tmp_path / "run"), "--out", str(tmp_path / "coco.json")]) == 0
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["disc", "square"]
    named = {i["id"]: os.path.basename(i["file_name"]) for i in coco["images"]}
    found = {(named[a["image_id"]], a["category_id"]) for a in coco["annotations"]}
    assert {("0.png", 1), ("1.png", 1), ("2.png", 1), (hostile, 2)} <= found

    capsys.readouterr()
    # a name the run does not hold is refused, not silently left out; a negative gallery is no count
    assert main(["report", str(tmp_path / "run"), "--images", "2.png", "nope.png"]) == 2
    assert "no image named 'nope.png'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "report" / "report.html").exists()
    with pytest.raises(SystemExit, match="2"):
        main(["report", str(tmp_path / "run"), "--gallery", "-1"])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run"), "--gallery", "1", "--images", "2.png", hostile]) == 0
    page_path = tmp_path / "run" / "report" / "report.html"
    assert json.loads(capsys.readouterr().out)["report"] == str(page_path)
    page = page_path.read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<img ") == 3  # the lowest-confidence image of the others, and the two asked for
    confidence = {n: report.image_confidence([{"class_name": a["category_id"], "score": a["score"]}
                                              for a in coco["annotations"] if named[a["image_id"]] == n])
                  for n in ("0.png", "1.png")}
    lowest, other = sorted(confidence, key=confidence.get)
    assert f"/{lowest}</b>" in page and f"/{other}</b>" not in page
    assert "broken.png" in page  # the errors table
    overlays = sorted(p.name for p in (tmp_path / "run" / "report" / "overlays").glob("*.png"))
    assert len(overlays) == 3 and all(re.fullmatch(r"[A-Za-z0-9_-]+-[0-9a-f]{10}\.png", n) for n in overlays), overlays
    dom, console = render(page_path)
    assert 'data-pictures-loaded="3"' in dom
    assert console == []


def render(page) -> tuple[str, list[str]]:
    """The page's DOM after load in headless Chromium (the Debian package), and its console messages."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CAMLABEL_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (scripts/setup.sh installs Debian's package as root)")
        pytest.skip("chromium is not installed")
    profile = page.parent / "chromium-profile"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_ray_train_workers_share_the_images_and_return_a_usable_model(tmp_path):
    made = planted(tmp_path / "train", 20, seed=4)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        spec = train(TrainConfig(images=str(tmp_path / "train"), out=str(tmp_path / "model"), epochs=2,
                                 input_size=96, batch_size=5, val_fraction=0, workers=2), progress=False)
    finally:
        ray.shutdown()
    assert [h["epoch"] for h in spec["history"]] == [1, 2] and spec["config"]["workers"] == 2
    assert spec["history"][-1]["train_images"] == len(made) // 2  # each of the two workers reads half
    loaded = load_model(model_dir=tmp_path / "model", device="cpu")
    assert loaded.class_names == list(CLASSES)
    assert json.loads((tmp_path / "model" / "localizer.json").read_text()) == spec
    assert not (tmp_path / ".camlabel-train").exists(), "Ray Train's run folder stayed (a rerun resumed it)"
    from ray.train import WorkerGroupError

    # images only the workers read, none readable: the workers' one line, not Ray Train's WorkerGroupError
    unreadable = SourceError("train: none of the training images could be read")
    failed = WorkerGroupError("rank 0: ...", {0: RuntimeError("gloo"), 1: unreadable})
    assert _as_user_error(failed) is unreadable
    other = WorkerGroupError("rank 0: ...", {0: RuntimeError("gloo")})
    assert _as_user_error(other) is other


def test_a_warning_naming_a_hostile_file_prints_it_escaped(tmp_path):
    """Warnings name files (a training image skipped): a name's terminal escape reaches the terminal escaped."""
    planted(tmp_path / "train", 4, seed=5)
    (tmp_path / "train" / "disc" / "\x1b[2J.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    done = subprocess.run([sys.executable, "-m", "camlabel.pipeline.cli", "train", str(tmp_path / "train"), "--out",
                           str(tmp_path / "model"), "--epochs", "1", "--input-size", "64", "--val-fraction", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "WARNING camlabel.pipeline.train: skipping " in done.stderr and "\\x1b[2J.png" in done.stderr
    assert "\x1b[2J" not in done.stderr


def test_sigterm_stops_ray_train_at_once(tmp_path):
    """Inside TorchTrainer.fit's ray.get, SIGTERM waited for the training's end: the model was written, exit 0."""
    planted(tmp_path / "train", 20, seed=4)
    out = tmp_path / "model"
    process = subprocess.Popen(
        [sys.executable, "-m", "camlabel.pipeline.cli", "train", str(tmp_path / "train"), "--out", str(out),
         "--epochs", "500", "--input-size", "96", "--batch-size", "5", "--workers", "2"],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any((tmp_path / ".camlabel-train").glob("model-*/*")):  # Ray Train's run
        time.sleep(0.2)
    time.sleep(0.5)  # the driver waits in fit
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()  # a training that went on: not left running
    assert time.time() - sent < 30, "training went on after SIGTERM"
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "camlabel train: stopped by SIGTERM; no file is left half-written"
    assert not list(out.glob("*")) and not (tmp_path / ".camlabel-train").exists()


def test_bad_training_and_model_dir_settings_fail_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="^epochs:"):
        TrainConfig(images=str(tmp_path), out=str(tmp_path / "m"), epochs=0).validate()
    with pytest.raises(ConfigError, match="^workers:"):
        TrainConfig(images=str(tmp_path), out=str(tmp_path / "m"), workers=0).validate()
    with pytest.raises(ConfigError, match="^ggam:"):
        TrainConfig(images=str(tmp_path), out=str(tmp_path / "m"), ggam=-1).validate()
    with pytest.raises(ConfigError, match="^model_dir:"):
        load_config(None, {"source": str(tmp_path), "out": str(tmp_path / "o"), "model_dir": str(tmp_path)})
    (tmp_path / "localizer.json").write_text("{}")
    with pytest.raises(ModelError, match="camlabel train"):
        load_model(model_dir=tmp_path)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "1.png")
    (tmp_path / "images" / "empty").mkdir()  # a folder without images is no class
    with pytest.raises(SourceError, match=r"one class \(cat\); a localizer learns to tell two or more apart"):
        labelled_images(str(tmp_path / "images"), None, [])
    with pytest.raises(SourceError, match=r"one class \(cat\)"):  # not each Ray Train worker's traceback
        train(TrainConfig(images=str(tmp_path / "images"), out=str(tmp_path / "m"), workers=2), progress=False)
    for name in ("dog/1.png", "dog/2.png", "cat/2.png"):
        (tmp_path / "images" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "images" / "cat" / "1.png").write_bytes(b"")
    with pytest.raises(SourceError, match="none of the training images could be read"):  # it wrote a model
        train(TrainConfig(images=str(tmp_path / "images"), out=str(tmp_path / "m"), epochs=1), progress=False)
    assert not (tmp_path / "m").exists()
    (tmp_path / "labels.csv").write_bytes(b"file_name,labels\n1.png,\xd0\xff\n")  # not UTF-8: no traceback
    with pytest.raises(SourceError, match="cannot read labels"):
        labelled_images(str(tmp_path / "images"), str(tmp_path / "labels.csv"), ["cat", "dog"])


def test_label_names_that_match_no_image_are_counted_in_a_warning(tmp_path, caplog):
    """A labels CSV naming files by another folder's paths trained on what matched and said nothing."""
    (tmp_path / "images" / "a").mkdir(parents=True)
    for name in ("1.png", "2.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / name)
    (tmp_path / "labels.csv").write_text("file_name,labels\n1.png,cat\na/2.png,dog\nmissing.png,cat\nb/2.png,dog\n")
    paths, labels, classes = labelled_images(str(tmp_path / "images"), str(tmp_path / "labels.csv"), ["cat", "dog"])
    assert len(paths) == 2 and labels == [[0], [1]] and classes == ["cat", "dog"]
    assert f"2 file names in {tmp_path}/labels.csv match no image under" in caplog.text  # by bare name, by path


def test_the_report_names_the_boxes_scoring_enough_and_counts_the_weaker_ones():
    """The demo's photos carry parts named as other things at scores near 0: they headed the class table."""
    anns = [{"class_name": "tabby", "score": 0.6}, {"class_name": "ocarina", "score": 0.01},
            {"class_name": "ocarina", "score": 0.02}]
    assert report.found(anns) == "tabby 0.60 (+2 weaker)"
    assert report.found(anns[1:]) == "nothing (+2 weaker)" and report.found([]) == "nothing"
    # the gallery's order: an image's least sure class, by that class's best box; not a part boxed apart
    assert report.image_confidence([*anns, {"class_name": "tabby", "score": 0.3}]) == 0.02
    assert report.image_confidence([anns[0], {"class_name": "tabby", "score": 0.01}]) == 0.6
    assert report.image_confidence([]) == 0.0
    bins = torch.zeros(report.BINS, dtype=torch.long)
    page = report._page({}, 1, Counter(tabby=1, ocarina=2), Counter(tabby=1), bins, bins, [], [], 0)
    rows = re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td><td>(\d+)</td>", page)
    assert rows == [("tabby", "1", "1"), ("ocarina", "0", "2")]  # the classes the pictures name come first


def test_labels_of_boxes_that_share_a_corner_do_not_cover_each_other():
    """The demo's astronaut: four boxes at the picture's top, and one name half hidden under another."""
    boxes = torch.tensor([[0.0, 0.0, 99.0, 99.0], [0.0, 0.0, 99.0, 99.0]])
    picture = report._label_boxes(torch.zeros(3, 100, 100, dtype=torch.uint8), boxes, ["worse 0.10", "best 0.90"])
    yellow = (picture == torch.tensor([255, 255, 0])[:, None, None]).all(0)
    assert yellow[:15, :40].float().mean() > 0.4  # the best at the top, inside (no room above)
    assert yellow[85:, :40].float().mean() > 0.4  # the other at the box's foot
    assert yellow[30:70].sum() == 0


def test_an_overlay_names_strong_boxes_and_draws_weak_ones_thin_grey_and_unnamed(monkeypatch):
    empty = mask_utils.encode(np.zeros((100, 100), np.uint8, order="F"))["counts"].decode("ascii")
    row = {"height": 100, "width": 100, "heatmaps": [], "annotations": [
        {"bbox": [10, 10, 40, 40], "score": 0.6, "class_name": "tabby", "rle_counts": empty},
        {"bbox": [60, 60, 30, 30], "score": 0.01, "class_name": "ocarina", "rle_counts": empty}]}
    named = []
    real = report._label_boxes
    monkeypatch.setattr(report, "_label_boxes", lambda *args: named.append(args[2]) or real(*args))
    picture = report.overlay(torch.zeros(3, 100, 100, dtype=torch.uint8), row)
    assert picture[:, 40, 10].tolist() == [255, 255, 0]  # the strong box's left edge: yellow
    assert picture[:, 60, 75].tolist() == [128, 128, 128]  # the weak one's: grey
    assert picture[:, 61, 75].tolist() == [0, 0, 0]  # one pixel wide
    assert named == [["tabby 0.60"]]  # only the strong box is named
    strip = picture[:, 10:28, 10:60]  # its name: black on a yellow strip inside the box (no room above it)
    yellow = (strip == torch.tensor([255, 255, 0])[:, None, None]).all(0).float().mean()
    black = (strip.amax(0) < 128).float().mean()  # the letters (anti-aliased)
    assert yellow > 0.4 and black > 0.05, (yellow, black)
