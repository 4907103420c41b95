"""The run's work list: the same plan whether made in memory or in spilled hash buckets."""

import logging
from pathlib import Path

import camlabel.pipeline.worklist as worklist
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from camlabel.pipeline.sources import SourceError
from camlabel.schemas.config import JobConfig
from camlabel.schemas.tables import ERRORS

NAMES = [str(i) for i in range(10)]


def collection(root):
    """A CSV manifest of 62 paths (one listed twice, many sharing a bare name) and labels by relative path,
    by bare name, by absolute path and twice for one name."""
    paths = [f"d{i % 4}/img{i % 25:02d}.jpg" for i in range(60)] + ["d0/img00.jpg", "/abs/img03.jpg"]
    (root / "manifest.csv").write_text("path\n" + "\n".join(paths) + "\n")
    (root / "labels.csv").write_text("file_name,labels\nd1/img01.jpg,1\nimg02.jpg,2\nimg05.jpg,5\nd2/img06.jpg,6 7\n"
                                     "img05.jpg,3\nnowhere.jpg,9\n/abs/img03.jpg,4\n")


def plan(root, tmp_copy):
    """The plan of a copy of root, with an earlier run and this run's own error parts."""
    import shutil

    shutil.copytree(root, tmp_copy)
    for run, rows in (("earlier", [("d1/img09.jpg", "duplicate"), ("d0/img12.jpg", "decode")]),
                      ("run", [("d2/img10.jpg", "annotate"), ("d3/img11.jpg", "read"), ("d3/img15.jpg", "decode")])):
        (tmp_copy / run / "errors").mkdir(parents=True)
        pq.write_table(pa.table({"path": [str(tmp_copy / p) for p, _ in rows], "stage": [s for _, s in rows],
                                 "reason": ["x"] * len(rows)}, schema=ERRORS),
                       tmp_copy / run / "errors" / "part-a.parquet")
    (tmp_copy / "run" / ".plan-killed").mkdir()  # what a planning task killed mid-way leaves
    config = JobConfig(source=str(tmp_copy / "manifest.csv"), out=str(tmp_copy / "run"),
                       labels=str(tmp_copy / "labels.csv"))
    counts = worklist.plan_work(config, NAMES, tmp_copy / "run", [tmp_copy / "earlier"])
    rows = pq.read_table(tmp_copy / "run" / worklist.WORK_LIST).to_pylist()
    assert not list((tmp_copy / "run").glob(".plan-*"))
    return counts, sorted((r["path"].replace(str(tmp_copy), ""), r["labels"]) for r in rows)


def test_a_collection_planned_in_buckets_gets_the_plan_made_in_memory(tmp_path, monkeypatch, caplog):
    root = tmp_path / "src"
    root.mkdir()
    collection(root)
    whole = plan(root, tmp_path / "whole")
    monkeypatch.setattr(worklist, "BUCKET_ROWS", 7)
    monkeypatch.setattr(worklist, "SPILL_ROWS", 8)
    with caplog.at_level(logging.INFO, logger="camlabel.pipeline.worklist"):
        bucketed = plan(root, tmp_path / "bucketed")
    assert any("buckets" in r.getMessage() for r in caplog.records)
    assert bucketed == whole
    (inputs, todo, unmatched, _), rows = whole
    assert inputs == 61 and todo == 58 and len(rows) == 58  # one path listed twice; three settled
    assert unmatched == 1  # nowhere.jpg (img05.jpg's two rows are one name, and match)
    labels = dict(rows)
    assert labels["/d1/img01.jpg"] == "1" and labels["/d2/img02.jpg"] == labels["/d3/img02.jpg"] == "2"  # by
    # relative path; by bare name (wherever it is)
    assert labels["/d1/img05.jpg"] == "3" and labels["/d2/img06.jpg"] == "6 7"  # a name's last row wins
    assert labels["/d2/img01.jpg"] == "-" and labels["/abs/img03.jpg"] == "4"  # by its absolute path
    assert labels["/d3/img11.jpg"] == "-"  # a read error is planned again, without labels
    assert labels["/d0/img12.jpg"] == "-"  # and an earlier run's decode error (a file then still being copied)
    assert not {"/d1/img09.jpg", "/d2/img10.jpg", "/d3/img15.jpg"} & set(labels)  # settled, here or earlier


def test_a_bad_line_deep_in_a_spilled_manifest_is_named(tmp_path, monkeypatch):
    root = tmp_path / "src"
    root.mkdir()
    lines = [f"a/{i}.jpg" for i in range(40)]
    lines[30] = "../escape.jpg"
    (root / "manifest.csv").write_text("path\n" + "\n".join(lines) + "\n")
    (root / "run").mkdir()
    monkeypatch.setattr(worklist, "BUCKET_ROWS", 7)
    monkeypatch.setattr(worklist, "SPILL_ROWS", 4)
    with pytest.raises(SourceError, match=r"manifest.csv:32: path '../escape.jpg' climbs out"):
        worklist.plan_work(JobConfig(source=str(root / "manifest.csv"), out=str(root / "run")), NAMES, root / "run", [])


def test_a_header_only_manifest_and_labels_plan_nothing(tmp_path):
    (tmp_path / "manifest.csv").write_text("path\n")
    (tmp_path / "labels.csv").write_text("file_name,labels\n")
    config = JobConfig(source=str(tmp_path / "manifest.csv"), out=str(tmp_path / "run"),
                       labels=str(tmp_path / "labels.csv"))
    assert worklist.plan_work(config, NAMES, tmp_path / "run", []) == (0, 0, 0, {})
    assert pq.read_table(tmp_path / "run" / worklist.WORK_LIST).num_rows == 0


def test_earlier_contents_are_found_by_hash_and_named_however_many_ranges_they_were_sorted_in(tmp_path,
                                                                                              monkeypatch):
    """The index of the earlier runs' contents (pipeline.contents) that planning writes: an image_id an
    earlier run annotated gives its path, any other None, also when two ids share their first 8 bytes;
    sorted in several hash ranges it is the same index as sorted at once."""
    import hashlib

    import numpy as np
    from camlabel.pipeline.contents import HASHES, EarlierContents
    from camlabel.pipeline.writers import write_part
    from camlabel.schemas.tables import RESULTS

    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    ids += [ids[0][:16] + "0" * 48, ids[0][:16] + "f" * 48]  # the first 8 bytes of ids[0], then others
    for run, chosen in (("a", range(0, 25)), ("b", range(25, 42))):
        rows = [{"path": f"/{run}/{i}.jpg", "image_id": ids[i], "width": 1, "height": 1, "annotations": []}
                for i in chosen if i != 41]  # the last id was never annotated
        write_part(tmp_path / run, pa.Table.from_pylist(rows, schema=RESULTS))
    (tmp_path / "src").mkdir()
    config = JobConfig(source=str(tmp_path / "src"), out=str(tmp_path / "run"))
    found = {}
    for label, bucket_rows in (("at once", 10**6), ("in ranges", 6)):
        monkeypatch.setattr(worklist, "BUCKET_ROWS", bucket_rows)
        worklist.plan_work(config, NAMES, tmp_path / label, [tmp_path / "a", tmp_path / "b"])
        hashes = np.fromfile(tmp_path / label / HASHES, "<u8")
        assert len(hashes) == 41 and (hashes[:-1] <= hashes[1:]).all()
        found[label] = EarlierContents(worklist.Location.of(tmp_path / label)).earlier_paths(
            ids + [hashlib.sha256(b"new").hexdigest()])
    assert found["in ranges"] == found["at once"]
    assert found["at once"] == [f"/a/{i}.jpg" for i in range(25)] + [f"/b/{i}.jpg" for i in range(25, 41)] + [None,
                                                                                                               None]


def test_files_that_share_one_name_spread_over_the_buckets_unless_labels_name_bare_files(tmp_path, monkeypatch):
    """A collection of `image.jpg` in every folder: with labels by relative path (or none) the buckets key on
    the relative path and stay small; only labels that name bare files need the file name as key."""
    (tmp_path / "manifest.csv").write_text("path\n" + "".join(f"f{i:02d}/image.jpg\n" for i in range(40)))
    (tmp_path / "labels.csv").write_text("file_name,labels\nf03/image.jpg,3\nf31/image.jpg,1\n")
    config = JobConfig(source=str(tmp_path / "manifest.csv"), out="unused", labels=str(tmp_path / "labels.csv"))
    whole = worklist.plan_work(config, NAMES, tmp_path / "whole", [])
    sizes = []
    plan_bucket = worklist._plan_bucket
    monkeypatch.setattr(worklist, "_plan_bucket", lambda writer, source, listed, *rest: sizes.append(len(listed))
                        or plan_bucket(writer, source, listed, *rest))
    monkeypatch.setattr(worklist, "BUCKET_ROWS", 2)  # a CSV's size says about 8 rows: four buckets
    assert worklist.plan_work(config, NAMES, tmp_path / "bucketed", []) == whole == (40, 40, 0, {})
    read = [pq.read_table(tmp_path / run / worklist.WORK_LIST).sort_by("path").to_pylist()
            for run in ("whole", "bucketed")]
    assert read[0] == read[1] and {r["path"].split("/")[-2]: r["labels"] for r in read[0] if r["labels"] != "-"} \
        == {"f03": "3", "f31": "1"}
    assert len(sizes) == 4 and max(sizes) < 20  # by file name, one bucket held all 40


def test_a_job_writing_into_its_source_never_lists_its_own_outputs(tmp_path):
    """An output folder inside the source: the report's overlays and label maps there are not images to do; a
    source inside the output folder is the user's own and is listed whole."""
    for name in ("a.jpg", "sub/b.png", "notes.txt", "out/report/overlays/a-0123456789.png", "out/masks/a.jpg.png",
                 "out/images/c.jpg", "out/manifest.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    left_out = {}

    def planned(source, out):
        plan = worklist.plan_work(JobConfig(source=str(source), out=str(out)), NAMES, tmp_path / "plans" / out.name,
                                  [])
        left_out[out.name] = plan.left_out
        rows = pq.read_table(tmp_path / "plans" / out.name / worklist.WORK_LIST).column("path").to_pylist()
        return sorted(str(Path(p).relative_to(tmp_path)) for p in rows)

    assert planned(tmp_path, tmp_path / "out") == ["a.jpg", "sub/b.png"]
    assert left_out["out"] == {".txt": 1}  # the run's own files are not the source's left out
    assert planned(f"{tmp_path}/**/*.jpg", tmp_path / "out") == ["a.jpg"]
    assert planned(tmp_path / "out" / "images", tmp_path / "out") == ["out/images/c.jpg"]
    assert len(planned(tmp_path, tmp_path / "elsewhere")) == 5
    assert left_out["elsewhere"][".json"] == 1 and left_out["elsewhere"][".txt"] == 1
