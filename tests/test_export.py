"""COCO export from written parts, checked against the rows it was given (no Ray needed)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from camlabel.pipeline.cli import main
from camlabel.pipeline.export import export_coco
from camlabel.pipeline.report import described
from camlabel.pipeline.writers import atomic_write_json, read_parts, run_counts, write_part
from camlabel.schemas.tables import IMAGES, RESULTS
from pycocotools.coco import COCO


def result_row(i: int, boxes: int) -> dict:
    """Image i of 40x30 with `boxes` annotations of class i % 3, box i px from the corner."""
    row = {name: None for name in RESULTS.names}
    row.update(path=f"/data/img{i:03d}.jpg", image_id=f"{i:064x}", width=40, height=30, heatmaps=[],
               annotations=[{"category_id": i % 3 + 1, "class_name": f"c{i % 3}", "bbox": [i % 10, 1.0, 5.0, 4.0],
                             "score": 0.5 + b / 10, "area": 20, "rle_counts": "0"} for b in range(boxes)])
    return row


@pytest.fixture
def run(tmp_path):
    """A run of 11 images in three parts, image 4 without any annotation."""
    run_dir = tmp_path / "run"
    for first in (0, 4, 8):
        rows = [result_row(i, 0 if i == 4 else 1 + i % 2) for i in range(first, min(first + 4, 11))]
        write_part(run_dir, pa.Table.from_pylist(rows, schema=RESULTS))
    atomic_write_json(run_dir / "manifest.json", {"source": "/data", "model": {"class_names": ["c0", "c1", "c2"]}})
    return run_dir


def boxes_by_file(coco: COCO) -> dict:
    return {coco.imgs[i]["file_name"]: sorted((a["category_id"], a["bbox"], a["score"]) for a in coco.imgToAnns[i])
            for i in coco.getImgIds()}


def expected_boxes(root="/data") -> dict:
    return {f"{root}/img{i:03d}.jpg" if root else f"img{i:03d}.jpg": sorted(
        (i % 3 + 1, [float(i % 10), 1.0, 5.0, 4.0], 0.5 + b / 10) for b in range(0 if i == 4 else 1 + i % 2))
        for i in range(11)}


def test_one_file_holds_every_row_exactly_once(run, tmp_path):
    summary = export_coco([run], tmp_path / "coco.json")
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(list((run / "annotations").glob("part-*"))) == 3
    assert summary["images"] == 11 and summary["annotations"] == 15 == len(coco.getAnnIds())
    assert boxes_by_file(coco) == expected_boxes()
    assert [c["name"] for c in coco.dataset["categories"]] == ["c0", "c1", "c2"]
    assert sorted(coco.getImgIds()) == list(range(1, 12)) and sorted(coco.getAnnIds()) == list(range(1, 16))
    assert run_counts(run) == {"annotated": 11, "errors": 0, "annotations": 15}  # from the parts' footers


def test_a_run_named_twice_is_exported_once_and_never_overwritten(run, tmp_path, capsys):
    summary = export_coco([run, str(run) + "/"], tmp_path / "coco.json")
    assert summary["images"] == 11 and summary["annotations"] == 15  # not 22 and 30
    manifest = (run / "manifest.json").read_text()
    for inside in (run / "manifest.json", run / "annotations" / "coco.json"):
        assert main(["export-coco", str(run), "--out", str(inside)]) == 2
        assert f"out: {inside} is " in capsys.readouterr().err
    assert (run / "manifest.json").read_text() == manifest and len(list((run / "annotations").iterdir())) == 3
    assert main(["export-coco", str(run), "--out", str(run / "coco.json")]) == 0  # beside the parts: fine
    other = tmp_path / "other"  # a run of a model with other classes: its ids would be read as this one's
    write_part(other, pa.Table.from_pylist([result_row(20, 1)], schema=RESULTS))
    atomic_write_json(other / "manifest.json", {"source": "/data", "model": {"class_names": ["disc", "square", "c2"]}})
    for flag in ([], ["--results"]):
        assert main(["export-coco", str(run), str(other), "--out", str(tmp_path / "mixed.json"), *flag]) == 2
        assert "made by a model with other classes" in capsys.readouterr().err
    (run / "manifest.json").write_text(json.dumps({"images": [], "annotations": []}))  # a COCO file in its place
    assert main(["export-coco", str(run), "--out", str(tmp_path / "again.json")]) == 2
    assert "is not a camlabel manifest" in capsys.readouterr().err
    (run / "manifest.json").write_text(json.dumps({"model": {"class_names": ["c0", "c1", "c2"]}}))  # no source
    assert main(["export-masks", str(run), "--out", str(tmp_path / "masks")]) == 2  # was a KeyError traceback
    assert "is not a camlabel manifest" in capsys.readouterr().err


def test_a_run_that_has_not_finished_is_exported_with_a_warning(run, tmp_path, caplog):
    """A stopped run (or one whose driver was killed: still `running`) was exported as if whole, silently."""
    for status, warned in (("stopped", True), ("running", True), ("finished", False)):
        atomic_write_json(run / "manifest.json", {"source": "/data", "status": status,
                                                  "model": {"class_names": ["c0", "c1", "c2"]}})
        caplog.clear()
        assert export_coco([run], tmp_path / "coco.json")["images"] == 11
        assert (f"{run} has not finished (status {status}): only the images of its finished parts" in caplog.text) \
            is warned
        assert main(["report", str(run), "--out", str(tmp_path / status), "--gallery", "0"]) == 0
        assert f"<tr><th>status</th><td>{status}</td></tr>" in (tmp_path / status / "report.html").read_text()


def test_a_damaged_part_is_named_not_a_traceback(run, tmp_path, capsys):
    """Parts are written whole; one cut short later (a partial copy) stops the readers in one line naming it."""
    part = sorted((run / "annotations").glob("part-*"))[1]
    part.write_bytes(part.read_bytes()[:100])
    for command in (["export-coco", str(run), "--out", str(tmp_path / "coco.json")],
                    ["report", str(run), "--out", str(tmp_path / "report")]):
        assert main(command) == 2
        assert f"{part} does not read; the next annotate into its run moves it to quarantine" in capsys.readouterr().err
    assert not (tmp_path / "coco.json").exists()


def test_sigterm_mid_export_leaves_the_old_file_and_no_temporary_one(tmp_path):
    """SIGTERM (a scheduler's stop) while the dataset is being written: the command ends in one line, the
    file it was replacing is as it was, and its temporary file is gone (the default action killed the
    process where it stood and left the temporary file beside the output)."""
    run_dir = tmp_path / "big"
    rows = [result_row(i, 2) for i in range(100_000)]
    for first in range(0, len(rows), 25_000):
        write_part(run_dir, pa.Table.from_pylist(rows[first:first + 25_000], schema=RESULTS))
    atomic_write_json(run_dir / "manifest.json", {"source": "/data", "model": {"class_names": ["c0", "c1", "c2"]}})
    out = tmp_path / "coco.json"
    out.write_text("earlier")
    process = subprocess.Popen([sys.executable, "-m", "camlabel.pipeline.cli", "export-coco", str(run_dir),
                                "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".coco.json.*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the export ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == "camlabel export-coco: stopped by SIGTERM; no file is left half-written"
    assert out.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["big", "coco.json"]


def test_shards_split_the_images_and_the_index_counts_them(run, tmp_path):
    assert main(["export-coco", str(run), "--out", str(tmp_path / "coco.json"), "--shard-size", "4"]) == 0
    index = json.loads((tmp_path / "coco.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["coco-00000.json", "coco-00001.json", "coco-00002.json"]
    assert [s["images"] for s in index["shards"]] == [4, 4, 3] and index["annotations"] == 15
    merged, image_ids, ann_ids = {}, [], []
    for shard in index["shards"]:
        coco = COCO(str(tmp_path / shard["file"]))
        assert len(coco.getAnnIds()) == shard["annotations"]
        merged |= boxes_by_file(coco)
        image_ids += coco.getImgIds()
        ann_ids += coco.getAnnIds()
    assert merged == expected_boxes()
    assert sorted(image_ids) == list(range(1, 12)) and sorted(ann_ids) == list(range(1, 16))  # unique across shards


def test_results_list_and_names_below_an_image_root(run, tmp_path, capsys):
    export_coco([run], tmp_path / "results.json", results=True)
    assert main(["export-coco", str(run), "--out", str(tmp_path / "coco.json"), "--image-root", "/data/"]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    assert boxes_by_file(coco) == expected_boxes(root="") and coco.dataset["info"]["image_root"] == "/data"
    export_coco([run], tmp_path / "other.json", image_root="/dat")  # not a folder of theirs: whole paths
    assert boxes_by_file(COCO(str(tmp_path / "other.json"))) == expected_boxes()
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 15 and len(coco.loadRes(results).getAnnIds()) == 15


def test_a_score_cut_leaves_out_weaker_boxes_and_keeps_every_image(run, tmp_path, capsys):
    assert main(["export-coco", str(run), "--out", str(tmp_path / "cut.json"), "--min-score", "0.55"]) == 0
    coco = COCO(str(tmp_path / "cut.json"))
    strong = {name: [box for box in boxes if box[2] >= 0.55] for name, boxes in expected_boxes().items()}
    assert boxes_by_file(coco) == strong and len(coco.getImgIds()) == 11  # images without a box stay: background
    assert sum(map(len, strong.values())) == 5 < 15
    assert main(["export-coco", str(run), "--out", str(tmp_path / "cut.json"), "--results", "--min-score", "0.55"]) == 0
    assert sorted(a["score"] for a in json.loads((tmp_path / "cut.json").read_text())) == [0.6] * 5
    with pytest.raises(SystemExit):
        main(["export-coco", str(run), "--out", str(tmp_path / "c.json"), "--min-score", "1.5"])
    assert "not a number from 0 to 1" in capsys.readouterr().err


def test_every_image_points_to_the_provenance_of_the_run_that_labelled_it(run, tmp_path):
    later = tmp_path / "later"  # a second run of the series, by another camlabel and torch
    write_part(later, pa.Table.from_pylist([result_row(i, 1) for i in (20, 21)], schema=RESULTS))
    made = {"source": "/data", "series": "abc", "versions": {"camlabel": "0.2.0", "torch": "2.14.1"},
            "settings": {"method": "cam", "input_size": 448}, "rule": {"name": "instances", "threshold": 0.45},
            "model": {"class_names": ["c0", "c1", "c2"], "name": "mobilenet_v2", "weights_sha256": "f00d"}}
    atomic_write_json(later / "manifest.json", made)
    export_coco([run, later], tmp_path / "coco.json", shard_size=8)
    shards = [json.loads((tmp_path / f"coco-{n:05d}.json").read_text()) for n in (0, 1)]
    for shard in shards:  # each shard says where all its images came from
        first, second = shard["info"]["runs"]
        assert first == {"dir": str(run), "model": {}}  # a manifest without provenance gives none, not a guess
        assert second == {"dir": str(later), "model": {"name": "mobilenet_v2", "weights_sha256": "f00d"},
                          **{k: made[k] for k in ("series", "versions", "settings", "rule")}}
    made_by = {Path(i["file_name"]).name: i["camlabel_run"] for shard in shards for i in shard["images"]}
    assert made_by == {**{f"img{i:03d}.jpg": 0 for i in range(11)}, "img020.jpg": 1, "img021.jpg": 1}


def test_shard_size_must_be_positive(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export-coco", str(run), "--out", str(tmp_path / "c.json"), "--shard-size", "0"])
    assert "not a positive whole number" in capsys.readouterr().err


def test_runner_ups_reach_the_export_and_the_report_and_older_parts_without_them_still_read(tmp_path):
    run_dir = tmp_path / "run"
    row = result_row(0, 2)
    row["annotations"][1]["runner_ups"] = [{"category_id": 2, "class_name": "c1", "score": 0.2},
                                           {"category_id": 3, "class_name": "c2", "score": 0.01}]
    write_part(run_dir, pa.Table.from_pylist([row], schema=RESULTS))
    # a part written before annotations kept their runner-ups: the same columns, without the field
    older = pa.schema([pa.field(f.name, pa.list_(pa.struct([a for a in f.type.value_type if a.name != "runner_ups"])))
                       if f.name == "annotations" else f for f in IMAGES])
    old = {k: v for k, v in result_row(1, 1).items() if k in older.names}
    pq.write_table(pa.Table.from_pylist([old], schema=older), run_dir / "annotations" / "part-older.parquet")
    atomic_write_json(run_dir / "manifest.json", {"source": "/data", "model": {"class_names": ["c0", "c1", "c2"]}})
    export_coco([run_dir], tmp_path / "coco.json")
    coco = COCO(str(tmp_path / "coco.json"))
    by_score = {(a["image_id"], a["score"]): a for a in coco.dataset["annotations"]}
    assert len(by_score) == 3
    assert by_score[(1, 0.6)]["runner_ups"] == [{"category_id": 2, "score": 0.2}, {"category_id": 3, "score": 0.01}]
    assert "runner_ups" not in by_score[(1, 0.5)] and "runner_ups" not in by_score[(2, 0.5)]
    # a person reads the two best that score at least a tenth of the box's own
    shown = [described(a) for a in read_parts(run_dir / "annotations", IMAGES).to_pylist()[0]["annotations"]]
    assert shown == ["c0 0.50", "c0 0.60 (or c1 0.20)"]
