"""Runs written to an object store: S3 as moto serves it locally, through pyarrow's S3 filesystem."""

import json
import shutil

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from camlabel.pipeline.cli import main
from camlabel.pipeline.lease import LEASE_FILE, lease
from camlabel.pipeline.sources import SourceError, image_listing
from camlabel.pipeline.store import Location
from camlabel.schemas.config import ConfigError
from camlabel.workers.decode import read_bytes
from moto.server import ThreadedMotoServer
from pycocotools.coco import COCO

from tests.test_pipeline import annotate, collection, local_ray, ray_stops_with_the_module  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def bucket():
    """A URI of an empty bucket whose options (endpoint, credentials) travel with it to Ray's workers. The
    environment names the same store, as a cluster's pods would (`s3://labels/...`), for the Rays started after."""
    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = dict(access_key="k", secret_key="s", region="us-east-1", endpoint_override=f"{host}:{port}",
                   scheme="http")
    pafs.S3FileSystem(**options, allow_bucket_creation=True).create_dir("labels")
    environment = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        ray.shutdown()  # a Ray of an earlier module would not have it
        yield f"s3://k:s@labels/{{}}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_a_second_run_cannot_take_an_object_store_output_in_use(bucket):
    root = Location.of(bucket.format("busy"))
    with lease(root):
        assert (root / LEASE_FILE).is_file()
        with pytest.raises(ConfigError, match="is in use by the run of pid"):
            with lease(root):
                pass
    assert not (root / LEASE_FILE).is_file()


def test_incremental_runs_on_s3_resume_list_and_export(local_ray, collection, bucket, tmp_path, capsys):  # noqa: F811
    source, root = tmp_path / "incoming", bucket.format("series")
    source.mkdir()
    for name in ("cat.png", "coffee.png"):
        shutil.copy(collection / name, source / name)
    annotate(source, root, "--incremental")
    shutil.copy(collection / "horse.png", source / "horse.png")
    annotate(source, root, "--incremental")
    capsys.readouterr()
    assert main(["runs", root]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["status"], r["this_run"], r["annotated"]) for r in runs] == [("finished", 2, 2), ("finished", 1, 1)]

    store = Location.of(root)
    run_dirs = [store / "runs" / r["run"] for r in runs]
    for run in run_dirs:  # parts only: no temporary object, no work list, and the lease is gone
        assert [f.name for f in run.files()] == ["manifest.json"]
        assert all(p.name.startswith("part-") for p in (run / "annotations").files())
        assert json.loads((run / "manifest.json").read_text())["run_dir"] == str(run)
    assert not (store / LEASE_FILE).is_file()
    horse = pq.read_table((run_dirs[1] / "annotations").files()[0].path, filesystem=store.fs)
    assert horse.column("path").to_pylist() == [str(source / "horse.png")]

    assert main(["export-coco", root, "--out", str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    assert sorted(i["file_name"] for i in coco.imgs.values()) == [str(source / n) for n in ("cat.png", "coffee.png",
                                                                                              "horse.png")]
    capsys.readouterr()
    assert main(["eval", "--gt", str(tmp_path / "coco.json"), "--pred", root]) == 0  # scored as exported
    assert json.loads(capsys.readouterr().out)["corloc"] == 1.0
    first = bucket.format(f"series/runs/{runs[0]['run']}")
    assert main(["report", first, "--out", str(tmp_path / "report")]) == 0
    assert "coffee.png" in (tmp_path / "report" / "report.html").read_text()
    assert main(["export-masks", first, "--out", str(tmp_path / "masks")]) == 0
    assert sorted(p.name for p in (tmp_path / "masks").rglob("*.png")) == ["cat.png.png", "coffee.png.png"]


def test_a_bucket_source_lists_reads_and_annotates_every_key_as_written(local_ray, collection, bucket, capsys):  # noqa: F811
    """Keys with a space, '%', '?' or '#' (a URI would have them percent-encoded), listed from a source given
    with a trailing '/' and with credentials, each read back as its own file, and annotated. Both were lost, every
    image an error: a trailing '/' made the listing's paths bucket/key, read as local paths; a key with a space
    was no URI."""
    store = Location.of(bucket.format("shoot"))
    keys = ["a.png", "My Photos/IMG 001.png", "100%.png", "what?.png", "#1.png"]
    photo = (collection / "cat.png").read_bytes()
    for i, key in enumerate(keys):
        (store / key).write_bytes(photo + bytes([i]))  # each its own bytes, the same picture
    (store / "notes.txt").write_bytes(b"")
    for source in ("s3://labels/shoot/", "s3://k:s@labels/shoot"):
        listing = image_listing(source)
        head = source.split("labels/")[0]
        assert listing.left_out == {".txt": 1}
        assert listing.paths.to_pylist() == sorted(f"{head}labels/shoot/{key}" for key in keys)
        assert [read_bytes(path)[-1] for path in listing.paths.to_pylist()] == [
            keys.index(path.split("labels/shoot/")[1]) for path in listing.paths.to_pylist()]
    with pytest.raises(SourceError, match="options in a source URI .* AWS_ENDPOINT_URL"):
        image_listing(bucket.format("shoot"))

    out = bucket.format("shoot-labels")
    capsys.readouterr()
    annotate("s3://labels/shoot/", out)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["annotated"], summary["errors"]) == (5, 0)
    parts = Location.of(out) / "annotations"
    paths = [pq.read_table(part.path, filesystem=parts.fs).column("path").to_pylist() for part in parts.files()]
    assert sorted(sum(paths, [])) == sorted(f"s3://labels/shoot/{key}" for key in keys)
