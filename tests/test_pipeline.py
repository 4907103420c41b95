"""The annotate job end to end under a real local Ray, on real photos that scikit-image ships."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import torch
from camlabel.pipeline.cli import main
from camlabel.schemas.tables import ERRORS, IMAGES
from camlabel.workers.annotator import native_bfloat16
from PIL import Image
from pycocotools.coco import COCO
from ray import cloudpickle
from skimage import data

PHOTOS = {"cat.png": data.chelsea, "coffee.png": data.coffee, "rocket.jpg": data.rocket,
          "astronaut.png": data.astronaut, "horse.png": lambda: (data.horse() == 0).astype("uint8") * 255}


_running = []  # the patch the local Ray this module started runs in every worker (None: no fault)


def with_fault(patch=None):
    """Restart the local Ray so that every worker process runs `patch` first: faults are injected from
    outside the production code, into the real actor. A Ray already running with no fault is kept when
    none is asked for (each restart costs seconds)."""
    if patch is None and _running == [None] and ray.is_initialized():
        return
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": patch} if patch else None)
    _running[:] = [patch]


@pytest.fixture(scope="module", autouse=True)
def ray_stops_with_the_module():
    yield
    ray.shutdown()
    _running.clear()


@pytest.fixture
def local_ray():
    """A local Ray without faults: kept from test to test, started again after one that injected a fault."""
    with_fault(None)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for name, load in PHOTOS.items():
        Image.fromarray(load()).resize((160, 120)).save(root / ("sub" if name == "rocket.jpg" else "") / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "labels.csv").write_text("file_name,labels\ncat.png,tabby\nsub/rocket.jpg,812\ncoffee.png,967 504\n")
    return root


@pytest.fixture(scope="module")
def labelled_run(collection, tmp_path_factory):
    """A fault-free run over the collection with its labels, and the summary it printed: made once, for the
    tests that read it or compare a faulty run with it."""
    with_fault(None)
    out = tmp_path_factory.mktemp("labelled") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        annotate(collection, out, "--labels", str(collection / "labels.csv"))
    return out, json.loads(printed.getvalue().strip().splitlines()[-1])


def annotate(source, out, *extra):
    assert main(["annotate", str(source), "--out", str(out), "--input-size", "160", "--no-flip",
                 "--batch-size", "2", "--part-size", "2", *extra]) == 0


def rows(run_dir):
    table = pads.dataset(str(run_dir / "annotations"), schema=IMAGES, format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: r["path"])


def test_annotate_export_and_resume(local_ray, collection, labelled_run, tmp_path, capsys):
    made, summary = labelled_run
    out = tmp_path / "run"
    shutil.copytree(made, out)  # resumed below: a copy, the fixture's run stays as it was made
    assert summary["inputs"] == 6 and summary["annotated"] == 5 and summary["errors"] == 1

    first = rows(out)
    assert [r["path"].rsplit("/", 1)[1] for r in first] == ["astronaut.png", "cat.png", "coffee.png", "horse.png",
                                                             "rocket.jpg"]
    made = json.loads((out / "manifest.json").read_text())
    for part in [*(out / "annotations").glob("*.parquet"), *(out / "errors").glob("*.parquet")]:
        schema = pq.read_schema(part)
        assert schema.equals(IMAGES if part.parent.name == "annotations" else ERRORS, check_metadata=False)
        footer = json.loads(schema.metadata[b"camlabel.provenance"])  # a part read alone says what made it
        assert footer["model"] == {k: v for k, v in made["model"].items() if k != "class_names"}
        assert all(footer[k] == made[k] for k in ("versions", "settings", "rule", "series"))
        assert footer["devices"] == ["cpu"] and footer["precisions"] == made["precisions"]
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in first}
    assert by_name["cat.png"]["label_source"] == "labels"
    assert {a["category_id"] for a in by_name["cat.png"]["annotations"]} == {282}
    assert {a["category_id"] for a in by_name["coffee.png"]["annotations"]} <= {968, 505}
    assert {a["category_id"] for a in by_name["rocket.jpg"]["annotations"]} == {813}
    assert by_name["astronaut.png"]["label_source"] == "predicted"
    for row in first:  # runner-ups only without labels: other classes, scoring no more than their box
        for a in row["annotations"]:
            assert not a["runner_ups"] if row["label_source"] == "labels" else all(
                u["category_id"] != a["category_id"] and u["score"] <= a["score"] for u in a["runner_ups"])
    assert by_name["cat.png"]["width"] == 160 and by_name["cat.png"]["height"] == 120
    assert len({r["image_id"] for r in first}) == 5

    errors = pads.dataset(str(out / "errors"), schema=ERRORS, format="parquet").to_table().to_pylist()
    assert [(e["path"].rsplit("/", 1)[1], e["stage"]) for e in errors] == [("broken.jpg", "decode")]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0  # a plain run lists as its own one run (it held "no runs" before)
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["run"] == out.name and listed["status"] == "finished" and listed["annotated"] == 5
    assert manifest["model"]["weights_sha256"].startswith("b0353104")
    assert manifest["config"]["method"] == "cam" and manifest["versions"]["torch"]
    assert manifest["devices"] == ["cpu"]  # every actor's device, from the parts' counts
    assert manifest["precisions"] == ["bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"]  # auto
    # no actor is busy longer than the run, so the actors' own rate is at least the whole run's
    assert manifest["counts"]["this_run"] / manifest["seconds"] <= manifest["steady_images_per_second"]

    # resume: a deleted part is recomputed, and nothing else is touched or duplicated
    parts = sorted((out / "annotations").glob("part-*.parquet"))
    assert len(parts) >= 2
    parts[0].unlink()
    annotate(collection, out, "--labels", str(collection / "labels.csv"))
    capsys.readouterr()
    assert rows(out) == first
    assert not list(out.rglob(".*.tmp"))

    # the COCO export loads in pycocotools and holds exactly the rows' boxes
    coco_path = tmp_path / "coco.json"
    assert main(["export-coco", str(out), "--out", str(coco_path)]) == 0
    coco = COCO(str(coco_path))
    exported = {coco.imgs[i]["file_name"]: sorted((a["category_id"], a["bbox"]) for a in coco.imgToAnns[i])
                for i in coco.getImgIds()}
    assert exported == {r["path"]: sorted((a["category_id"], [round(v, 2) for v in a["bbox"]])
                                          for a in r["annotations"]) for r in first}
    (made_by,) = coco.dataset["info"]["runs"]  # and says what made them
    assert {i["camlabel_run"] for i in coco.dataset["images"]} == {0} and made_by["dir"] == str(out)
    resumed = json.loads((out / "manifest.json").read_text())
    assert made_by["model"]["weights_sha256"] == resumed["model"]["weights_sha256"] and "class_names" not in made_by
    assert made_by["versions"] == resumed["versions"] and made_by["rule"] == resumed["rule"]
    assert main(["export-coco", str(out), "--out", str(tmp_path / "results.json"), "--results"]) == 0
    assert len(coco.loadRes(str(tmp_path / "results.json")).getAnnIds()) == len(coco.getAnnIds())
    capsys.readouterr()
    scored = []  # the run scored as its export is (against the export itself as ground truth)
    for pred in (coco_path, out):
        assert main(["eval", "--gt", str(coco_path), "--pred", str(pred)]) == 0
        scored.append(json.loads(capsys.readouterr().out))
    assert scored[0] == scored[1] and scored[0]["corloc"] == 1.0


def dies_once(marker):
    def patch():
        from camlabel.workers.annotator import Annotator

        annotate_batch = Annotator.__call__

        def dying(self, *args, **kwargs):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return annotate_batch(self, *args, **kwargs)

        Annotator.__call__ = dying
    return patch


def fails_on(file_name):
    def patch():
        from camlabel.workers.actor import AnnotateActor

        record = AnnotateActor._record

        def failing(self, group, labels, batch, rows):
            if any(str(batch["path"][i]).endswith(file_name) for i in group):
                raise RuntimeError("injected model failure")
            return record(self, group, labels, batch, rows)

        AnnotateActor._record = failing
    return patch


def disk_full():
    def patch():
        import errno

        from camlabel.pipeline import writers

        def full(*_args, **_kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        writers.atomic_write_table = full  # every part the actors write
    return patch


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the patches travel to the workers by value


def test_a_killed_actor_is_replaced_and_nothing_is_lost(collection, labelled_run, tmp_path):
    with_fault(dies_once(str(tmp_path / "died")))
    faulty = tmp_path / "faulty"
    annotate(collection, faulty, "--labels", str(collection / "labels.csv"))
    assert (tmp_path / "died").exists()
    assert rows(faulty) == rows(labelled_run[0])


def test_a_model_that_fails_on_one_image_loses_only_that_image(collection, tmp_path):
    with_fault(fails_on("cat.png"))
    out = tmp_path / "run"
    annotate(collection, out, "--batch-size", "8")  # the cat shares its batch, and its labels group, with others
    errors = pads.dataset(str(out / "errors"), schema=ERRORS, format="parquet").to_table().to_pylist()
    assert sorted((os.path.basename(e["path"]), e["stage"]) for e in errors) == [
        ("broken.jpg", "decode"), ("cat.png", "annotate")]
    assert "injected" in next(e["reason"] for e in errors if e["stage"] == "annotate")
    assert [os.path.basename(r["path"]) for r in rows(out)] == ["astronaut.png", "coffee.png", "horse.png",
                                                                "rocket.jpg"]


def test_a_full_disk_ends_the_run_in_one_line_and_the_same_command_resumes_it(collection, tmp_path, capsys):
    """ENOSPC in the actors that write the parts was Ray Data's traceback, 120 lines, and exit 1."""
    with_fault(disk_full())
    out = tmp_path / "run"
    command = ["annotate", str(collection), "--out", str(out), "--input-size", "160", "--no-flip"]
    assert main(command) == 2
    err = capsys.readouterr().err  # Ray Data logs the failure too, quietly only in a Ray that camlabel starts
    assert err.strip().splitlines()[-1] == (f"camlabel annotate: {out}: [Errno 28] No space left on device; the parts "
                                            "written are kept: mend it (free space, remount) and run the same command "
                                            "to resume")
    with_fault(None)
    assert main(command) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["annotated"], summary["errors"]) == (5, 1)


@pytest.fixture(scope="module")
def many_cats(collection, tmp_path_factory):
    """24 copies of the cat, each with a distinct byte appended (distinct content, same pixels), and a
    clean uninterrupted run of them to compare with (made once: the tests that stop a run half way read
    them and write elsewhere)."""
    source = tmp_path_factory.mktemp("many")
    for i in range(24):
        shutil.copy(collection / "cat.png", source / f"cat{i:02d}.png")
        (source / f"cat{i:02d}.png").open("ab").write(bytes([i]))
    clean = tmp_path_factory.mktemp("many-clean") / "clean"
    with_fault(None)
    annotate(source, clean)
    return source, clean


def annotate_command(source, out) -> list[str]:
    """`camlabel annotate` as its own process, in small parts, so it can be killed or stopped half way."""
    return [sys.executable, "-m", "camlabel.pipeline.cli", "annotate", str(source), "--out", str(out),
            "--input-size", "160", "--no-flip", "--batch-size", "2", "--part-size", "2", "--actors", "1"]


def camlabel_lines(err: str) -> list[str]:
    """camlabel's own lines on stderr, apart from what Ray's log monitor forwards from its processes at
    any time (late lines of an earlier run among them, e.g. the GCS or a raylet reporting the last run's
    actors gone); no traceback anywhere."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("camlabel ")]


def without_ray_address() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_a_tiny_run_prints_no_warnings_of_rays(collection, tmp_path):
    """One image, two cores: no idle actor (Ray Data warns of one), and not the false alarm Ray's C++ core
    logs for every actor pool (ray-project/ray#57733); the summary comes last, after the progress bar."""
    done = subprocess.run([sys.executable, "-m", "camlabel.pipeline.cli", "annotate", str(collection / "cat.*"),
                           "--out", str(tmp_path / "one"), "--input-size", "160", "--no-flip"],
                          env=without_ray_address(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "constructor arguments" not in done.stderr, done.stderr
    assert "annotate: 100%" in done.stderr and json.loads(done.stdout)["annotated"] == 1


def test_rays_false_alarms_are_dropped_from_stderr_and_every_other_line_is_forwarded():
    """What the driver's stderr filter drops (`RAY_FALSE_ALARMS`): written to fd 2 as C++ and Ray's log monitor
    write them, in a process whose stderr is its own, as a run's is."""
    script = """if True:
        import os, sys, time
        from camlabel.pipeline.job import drop_false_alarms
        drop_false_alarms()
        os.write(2, b"[core_worker.cc:123] Actor has constructor arguments in the object store and ...\\n")
        print("kept: first", file=sys.stderr)
        os.write(2, b"(raylet) Task MapWorker.submit failed. Error: The actor is dead because it was killed by ")
        os.write(2, b"`ray.kill`.")  # unbuffered Python writes a line's text and its newline apart
        time.sleep(0.01)
        os.write(2, b"\\nkept: second\\nkept: third, then a partial line")
        """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "kept: first\nkept: second\nkept: third, then a partial line"


def test_a_killed_driver_resumes_and_broken_parts_are_redone(local_ray, many_cats, tmp_path):
    """SIGKILL the driver (and its local Ray) once parts exist; the same command then finishes the job.
    A part cut short by a non-atomic store is set aside and its images annotated again."""
    source, clean = many_cats
    out = tmp_path / "killed"
    process = subprocess.Popen(annotate_command(source, out), start_new_session=True, env=without_ray_address(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("annotations/part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    parts = sorted(out.glob("annotations/part-*.parquet"))
    assert 2 <= len(parts) < 12, "the driver was not killed half way"
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # a part cut short
    (out / "annotations" / ".part-x.parquet.tmp").write_bytes(b"half written")
    annotate(source, out)
    assert rows(out) == rows(clean)
    assert (out / "quarantine" / f"annotations-{parts[0].name}").exists()


def test_sigterm_mid_run_commits_what_is_done_and_exits_plainly(local_ray, many_cats, tmp_path):
    source, clean = many_cats
    out = tmp_path / "stopped"
    process = subprocess.Popen(annotate_command(source, out), env=without_ray_address(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("annotations/part-*.parquet")):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = process.communicate(timeout=60)
    assert time.time() - sent < 30, "the job took over 30 s to stop"
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "Aborted" not in err and "stack" not in err.lower(), err
    assert "Execution plan" not in err and "Progress bars disabled" not in err, err  # Ray Data's INFO: -v only
    assert "constructor arguments in the object store" not in err, err  # Ray's false alarm (ray#57733): -v only
    last = err.strip().splitlines()[-1]
    assert last.startswith("camlabel annotate: stopped by SIGTERM;") and "run the same command to resume" in last
    assert json.loads((out / "manifest.json").read_text())["status"] == "stopped"
    kept = len(rows(out))
    assert 0 < kept < 24, "the job was not stopped half way"
    annotate(source, out)
    assert rows(out) == rows(clean)  # nothing lost, nothing written twice


def test_sigterm_while_planning_stops_as_plainly(tmp_path):
    """A run of millions of images plans for minutes: SIGTERM then stops it the same way, with nothing kept
    yet (Ray's own handler aborted the driver with a stack dump; in ray.get, Stopped came out a SystemError)."""
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"img/{i:07d}.jpg\n" for i in range(2_000_000)))
    out = tmp_path / "run"
    process = subprocess.Popen(annotate_command(listing, out), env=without_ray_address(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob(".plan-*")):  # the planning task's scratch
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    assert err.strip().splitlines()[-1].startswith("camlabel annotate: stopped by SIGTERM; 0 images are kept")
    assert json.loads((out / "manifest.json").read_text())["status"] == "stopped"
    assert not (out / "work-list.parquet").exists(), "the job was not stopped while planning"


def test_ray_starting_leaves_the_stop_handler_in_place():
    """ray.init puts in its own SIGTERM handler, sys.exit(15): export-masks and train, which start Ray under the
    CLI's stop handler, then stopped with exit 15 and no word."""
    from camlabel.pipeline.job import connect
    from camlabel.pipeline.signals import Stopped, kept_from_ray, stopped_by_signals

    ray.shutdown()
    _running.clear()
    with stopped_by_signals():
        ours = signal.getsignal(signal.SIGTERM)
        connect(None)
        assert signal.getsignal(signal.SIGTERM) is ours
    ray.shutdown()
    # a SIGTERM while Ray starts meets Ray's handler: its exit becomes the same stop as any other
    with pytest.raises(Stopped, match="SIGTERM"), stopped_by_signals(), kept_from_ray():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))  # ray.init's, ray/_private/worker.py
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_a_run_where_every_image_fails_exits_1(local_ray, tmp_path, capsys):
    """A scheduled job whose every image is an error must not pass for one that worked (it exited 0)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(os.urandom(512))
    out = tmp_path / "run"
    assert main(["annotate", str(folder), "--out", str(out), "--input-size", "160"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["errors"] == 3
    last = captured.err.strip().splitlines()[-1]
    assert last == f"camlabel annotate: no image was annotated; the reasons of all 3 are in {out}/errors"
    assert pads.dataset(str(out / "errors"), schema=ERRORS, format="parquet").count_rows() == 3


def test_a_source_that_lists_no_images_and_labels_that_match_none_are_named_in_warnings(local_ray, tmp_path, caplog,
                                                                                        capsys):
    """A mistyped pattern (`*.JPG` for .jpg files) or a folder of phone photos (.heic) found nothing, and labels
    naming no listed image left their images to predicted classes: each said nothing."""
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("file_name,labels\na.jpg,1\n")
    assert main(["annotate", str(tmp_path / "*.JPG"), "--out", str(tmp_path / "run"),
                 "--labels", str(tmp_path / "labels.csv")]) == 0
    assert f"{tmp_path}/*.JPG matches no file (a pattern's letters match in their own case)" in caplog.text
    assert f"1 file names in {tmp_path}/labels.csv match no listed image" in caplog.text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["labels_unmatched"] == 1
    (tmp_path / "phone").mkdir()
    (tmp_path / "phone" / "IMG_0001.HEIC").write_bytes(b"")
    assert main(["annotate", str(tmp_path / "phone"), "--out", str(tmp_path / "run2")]) == 0
    assert f"files left out of {tmp_path}/phone, not named as images: .heic 1" in caplog.text
    assert f"{tmp_path}/phone lists no images (.apng .avif .bmp" in caplog.text


def test_a_folder_of_broken_and_hostile_files_is_fully_accounted_for(local_ray, tmp_path, capsys, caplog):
    from tests.test_inputs import ODD, encode, gradient

    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, make in ODD.items():
        (folder / f"{name}.{name if name in ('gif', 'webp') else 'png'}").write_bytes(make())
    good = encode(Image.fromarray(gradient(64, 48)), "JPEG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "random.jpg").write_bytes(os.urandom(4096))
    (folder / "page.png").write_bytes(b"<!doctype html><html><body>not an image</body></html>")
    (folder / "bomb.png").write_bytes(encode(Image.new("1", (30000, 30000)), "PNG"))
    (folder / "dup_a.jpg").write_bytes(good)
    (folder / "dup_b.jpg").write_bytes(good)
    os.symlink(folder, folder / "loop")
    os.symlink("/dev/zero", folder / "device.jpg")  # endless bytes behind a photo's name
    os.symlink(folder / "gone.png", folder / "dangling.png")
    (folder / "new\nline.jpg").write_bytes(good)  # a name a line-based tool would split
    (folder / "strip.png").write_bytes(encode(Image.new("RGB", (20000, 1)), "PNG"))
    (folder / "float.tif").write_bytes(encode(Image.new("F", (40, 30)), "TIFF"))
    (folder / "postscript.jpg").write_bytes(encode(Image.new("RGB", (40, 30)), "EPS"))  # Ghostscript's, were it opened
    (folder / "phone.heic").write_bytes(good)  # not named as an image: counted, not listed
    (folder / "README").write_text("photos of the shoot")
    out = tmp_path / "run"
    annotate(folder, out)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["inputs"] == len(ODD) + 13 and summary["left_out"] == {".heic": 1, "": 1}
    assert f"files left out of {folder}, not named as images: no suffix 1, .heic 1" in caplog.text
    assert summary["annotated"] + summary["errors"] == summary["inputs"]
    errors = {e["path"].rsplit("/", 1)[1]: e for e in
              pads.dataset(str(out / "errors"), schema=ERRORS, format="parquet").to_table().to_pylist()}
    refused = {"zero.jpg", "random.jpg", "page.png", "bomb.png", "device.jpg", "dangling.png", "float.tif",
               "postscript.jpg"}
    assert set(errors) in (refused | {"truncated.jpg"}, refused)  # libjpeg may recover a truncated file's top half
    assert "refused" in errors["bomb.png"]["reason"] and "empty" in errors["zero.jpg"]["reason"]
    assert "not a regular file" in errors["device.jpg"]["reason"] and errors["dangling.png"]["stage"] == "read"
    annotated = {r["path"].rsplit("/", 1)[1]: r for r in rows(out)}
    assert annotated["dup_a.jpg"]["image_id"] == annotated["dup_b.jpg"]["image_id"] == annotated["new\nline.jpg"][
        "image_id"]
    assert annotated["tiny.png"]["width"] == 1 and annotated["cmyk_jpeg.png"]["height"] == 30
    assert (annotated["strip.png"]["width"], annotated["strip.png"]["height"]) == (20000, 1)
    assert "32-bit pixels" in errors["float.tif"]["reason"]
    assert (annotated["apng.png"]["width"], annotated["webp.webp"]["height"]) == (40, 30)  # first frames


def test_a_fixed_pool_of_cpu_actors_takes_one_part_each_at_a_time_and_the_others_queue_one_more():
    """CPU actors decode their own parts: in a fixed pool a queued part would leave another actor idle. A
    GPU actor keeps a decoded part waiting, and a growing pool needs queues to grow (Ray Data adds actors
    at a utilisation of 1.75 tasks each: one in flight would never get there, and the cluster test
    fails)."""
    from camlabel.pipeline.plan import Resources, actor_pool

    fixed = actor_pool(Resources(2, 0.0, 1.0, 8, 32, 2, decode_stage=False), blocks=10)
    assert (fixed.min_size, fixed.initial_size, fixed.max_size, fixed.max_tasks_in_flight_per_actor) == (2, 2, 2, 1)
    grows = actor_pool(Resources(2, 0.0, 1.0, 8, 32, 2, decode_stage=False, grows=True), blocks=10)
    assert (grows.min_size, grows.initial_size, grows.max_size, grows.max_tasks_in_flight_per_actor) == (1, 2, 10, 2)
    gpu = actor_pool(Resources(4, 1.0, 1.0, 32, 256, 16, decode_stage=True), blocks=3)  # 3 parts
    assert (gpu.min_size, gpu.initial_size, gpu.max_size, gpu.max_tasks_in_flight_per_actor) == (3, 3, 3, 2)


def test_decoding_in_the_actors_or_in_a_stage_of_its_own_gives_the_same_rows(local_ray, collection, tmp_path):
    from camlabel.pipeline.plan import Resources, annotate_stream
    from camlabel.pipeline.sources import list_images
    from camlabel.schemas.config import AnnotateSettings

    paths = list_images(str(collection))
    items = pa.table({"path": paths, "labels": ["-"] * len(paths)})
    work_list = tmp_path / "work-list.parquet"
    pq.write_table(items, work_list, row_group_size=4)  # blocks read across row groups
    settings = AnnotateSettings(input_size=96, scales=(1.0,), flip=False)
    written = {}
    for stage in (True, False):  # the GPU plan's decode tasks, on CPU here; the CPU plan's own decoding
        out = tmp_path / str(stage)
        resources = Resources(2, 0.0, 0.9, 2, 4, 2, decode_stage=stage)  # parts of two model batches
        counts = [row for t in annotate_stream(work_list, len(items), {}, settings, resources, out, False)
                  for row in t.to_pylist()]
        assert sum(c["annotated"] for c in counts) == 5 and sum(c["errors"] for c in counts) == 1  # broken.jpg
        written[stage] = rows(out)
    assert [r["path"] for r in written[True]] == [p for p in paths if "broken" not in p]
    assert written[True] == written[False]


def test_a_rerun_retries_read_errors_only_and_refuses_other_settings(local_ray, collection, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(collection / "cat.png", source / "cat.png")
    (source / "broken.jpg").write_bytes((collection / "broken.jpg").read_bytes())
    manifest = source / "list.csv"
    manifest.write_text("path\ncat.png\nbroken.jpg\nlater.png\n")  # later.png is not there yet: a read error
    out = tmp_path / "run"
    annotate(manifest, out)

    def errors():
        table = pads.dataset(str(out / "errors"), schema=ERRORS, format="parquet").to_table()
        return sorted((os.path.basename(e["path"]), e["stage"]) for e in table.to_pylist())

    assert errors() == [("broken.jpg", "decode"), ("later.png", "read")]
    shutil.copy(collection / "coffee.png", source / "later.png")  # the store mends
    capsys.readouterr()
    annotate(manifest, out)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert errors() == [("broken.jpg", "decode")]  # the decode error stays final, the read error is gone
    assert [os.path.basename(r["path"]) for r in rows(out)] == ["cat.png", "later.png"]
    assert (summary["this_run"], summary["annotated"], summary["errors"], summary["inputs"]) == (1, 2, 1, 3)

    assert main(["annotate", str(manifest), "--out", str(out), "--input-size", "160", "--no-flip",
                 "--method", "gradcam"]) == 2
    (line,) = camlabel_lines(capsys.readouterr().err)
    assert "method: " in line and "'cam', not 'gradcam'" in line

    # a manifest the planning task (a Ray task) refuses: exit 2 and its one line, not a remote traceback
    manifest.write_text("path\ncat.png\n../etc/passwd\n")
    assert main(["annotate", str(manifest), "--out", str(out), "--input-size", "160", "--no-flip"]) == 2
    (line,) = camlabel_lines(capsys.readouterr().err)
    assert "list.csv:3: path '../etc/passwd' climbs out" in line

    # a run made by a camlabel whose default box rule differed (no wide drop): its labels are of another kind
    made = json.loads((out / "manifest.json").read_text())
    assert made["rule"]["wide_drop"] == 0.05 and made["rule"]["large"]["mask_threshold"] == 0.4
    made["rule"]["wide_drop"], made["series"] = 0.0, "an older camlabel's"
    (out / "manifest.json").write_text(json.dumps(made))
    assert main(["annotate", str(manifest), "--out", str(out), "--input-size", "160", "--no-flip"]) == 2
    (line,) = camlabel_lines(capsys.readouterr().err)
    assert "rule.wide_drop: " in line and "0.0, not 0.05" in line

    # a run made before the fine maps held the detail map (its manifest does not name the layer)
    made["rule"]["wide_drop"] = 0.05
    assert made["model"].pop("detail_layer") == "features.13"
    (out / "manifest.json").write_text(json.dumps(made))
    assert main(["annotate", str(manifest), "--out", str(out), "--input-size", "160", "--no-flip"]) == 2
    (line,) = camlabel_lines(capsys.readouterr().err)
    assert "model.detail_layer: " in line and "None, not 'features.13'" in line

    # a run made before masks held the cells they enclose (its rule's revision 2)
    made["model"]["detail_layer"] = "features.13"
    assert made["rule"]["revision"] == 3
    made["rule"]["revision"] = 2
    (out / "manifest.json").write_text(json.dumps(made))
    assert main(["annotate", str(manifest), "--out", str(out), "--input-size", "160", "--no-flip"]) == 2
    (line,) = camlabel_lines(capsys.readouterr().err)
    assert "rule.revision: " in line and "2, not 3" in line


def test_incremental_runs_annotate_only_what_is_new_and_name_content_duplicates(local_ray, collection, tmp_path,
                                                                                 capsys, caplog):
    source, out = tmp_path / "incoming", tmp_path / "root"
    source.mkdir()
    for name in ("cat.png", "coffee.png"):
        shutil.copy(collection / name, source / name)
    whole = (collection / "astronaut.png").read_bytes()
    (source / "late.png").write_bytes(whole[: len(whole) // 2])  # still being copied when the first run reads it
    annotate(source, out, "--incremental")
    (source / "late.png").write_bytes(whole)
    shutil.copy(collection / "horse.png", source / "horse.png")
    shutil.copy(collection / "cat.png", source / "cat_again.png")  # same content, new name
    annotate(source, out, "--incremental")
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["status"] for r in runs] == ["finished", "finished"] and runs[0]["series"] == runs[1]["series"]
    # the copy cut short did not decode; the next run reads it again, now whole, and annotates it
    assert [(r["this_run"], r["annotated"], r["errors"]) for r in runs] == [(3, 2, 1), (3, 2, 1)]
    first, second = sorted((out / "runs").iterdir())[:2]
    (late,) = pads.dataset(str(first / "errors"), schema=ERRORS, format="parquet").to_table().to_pylist()
    assert late["stage"] == "decode" and late["path"].endswith("late.png")
    (duplicate,) = pads.dataset(str(second / "errors"), schema=ERRORS, format="parquet").to_table().to_pylist()
    assert duplicate["stage"] == "duplicate" and duplicate["path"].endswith("cat_again.png")
    assert duplicate["reason"].startswith(f"same content as {source / 'cat.png'}")
    assert sorted(r["path"] for r in rows(second)) == [str(source / "horse.png"), str(source / "late.png")]

    annotate(source, out, "--incremental", "--method", "gradcam")  # another series: a run of its own, all anew
    capsys.readouterr()
    assert main(["runs", str(out)]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(runs) == 3 and runs[2]["series"] != runs[0]["series"] and runs[2]["this_run"] == 5
    # the root exports its newest series: merged with the first, every image would be in it twice
    assert main(["export-coco", str(out), "--out", str(tmp_path / "coco.json")]) == 0
    assert f"left out 2 runs of other series ({runs[0]['series']})" in caplog.text
    names = [i["file_name"] for i in json.loads((tmp_path / "coco.json").read_text())["images"]]
    assert sorted(names) == [r["path"] for r in rows(sorted((out / "runs").iterdir())[2])] and len(names) == 5


def test_a_block_of_the_work_list_reads_exactly_its_rows(tmp_path):
    from camlabel.pipeline.plan import read_rows
    from camlabel.pipeline.store import Location

    path = tmp_path / "work-list.parquet"
    pq.write_table(pa.table({"path": [str(i) for i in range(100)]}), path, row_group_size=7)
    for start, stop in [(0, 10), (5, 9), (7, 14), (13, 50), (95, 100), (0, 100)]:  # inside, across, at edges
        rows = pa.concat_tables(read_rows(Location.of(path), start, stop)).column("path").to_pylist()
        assert rows == [str(i) for i in range(start, stop)]
