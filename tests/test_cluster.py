"""A real two-node Ray cluster on this machine: `ray job submit` runs the RayJob's entrypoint.

A nightly run started on the head alone takes the second node when it joins (the actor pool grows); the next
night's submission, over a grown source, annotates only the new images (incremental runs).
Also checks the deploy/ manifests for the fields the cluster relies on.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from skimage import data

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent
# the first night's images: about a minute of one actor's work (a third of a second each here), so that the
# joining node's actor, which takes 15 s to start, has parts to take well before the end (measured: its first
# part came 19 s before the last)
CATS = 192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env, timeout=300, check=True):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=check)


@pytest.fixture
def cluster(tmp_path):
    """A head node; the test joins a worker node with cluster["join"](). Each node runs under its own
    `ray start --block`, ended by SIGTERM afterwards, which stops that node's processes and no others
    (`ray stop` would end every Ray process on the machine, other people's local jobs included)."""
    import ray

    ray.shutdown()
    gcs, dashboard = free_port(), free_port()
    # loopback-only test cluster: no token (real clusters share one: RAY_AUTH_MODE=token, see deploy/README.md);
    # no drain on SIGTERM: a node stopped after its jobs ended has nothing to drain, yet the head waited out
    # the whole 30 s default
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    nodes: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        """`ray start --block ARGS` in a session of its own; returns once the node is up. Its agents get
        free ports: Ray's fixed defaults would collide with any other Ray on the machine."""
        log = tmp_path / f"node{len(nodes)}.log"
        agents = [f"--{name}-port={free_port()}" for name in ("dashboard-agent-listen", "dashboard-agent-grpc",
                                                               "runtime-env-agent", "metrics-export")]
        with open(log, "w") as out:
            nodes.append(subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1",
                                           "--disable-usage-stats", *agents, *args], env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert nodes[-1].poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    try:
        start("--head", f"--port={gcs}", f"--ray-client-server-port={free_port()}", "--include-dashboard=true",
              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
        deadline = time.time() + 120  # the dashboard's job server comes up after the node does
        while ray_cli("job", "list", "--address", f"http://127.0.0.1:{dashboard}", env=env, check=False).returncode:
            assert time.time() < deadline, "the Ray job server did not come up"
            time.sleep(2)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}",
               "join": lambda: start(f"--address=127.0.0.1:{gcs}")}
    finally:
        for node in reversed(nodes):  # the worker node first, as its head still answers
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:  # only this node's session
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def submit(cluster, submission_id: str, config: Path, *flags: str, wait: bool = True) -> None:
    """Submit without tailing logs (a busy dashboard may drop that stream), then poll the status. The
    head's job agent may come up after its dashboard answers: a refused submission is retried."""
    deadline = time.time() + 120
    while True:
        done = ray_cli("job", "submit", "--address", cluster["dashboard"], "--submission-id", submission_id,
                       "--no-wait", "--", "camlabel", "annotate", "--config", str(config), *flags,
                       env=cluster["env"], check=False)
        if done.returncode == 0:
            break
        assert time.time() < deadline, done.stdout + done.stderr
        time.sleep(3)
    if wait:
        finished(cluster, submission_id)


def finished(cluster, submission_id: str) -> None:
    deadline = time.time() + 600
    while time.time() < deadline:
        status = ray_cli("job", "status", "--address", cluster["dashboard"], submission_id, env=cluster["env"],
                         check=False).stdout.lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = ray_cli("job", "logs", "--address", cluster["dashboard"], submission_id, env=cluster["env"],
                   check=False).stdout
    assert "succeeded" in status, logs[-3000:]


def test_a_run_grows_onto_a_joining_node_and_scheduled_jobs_are_incremental(cluster, tmp_path):
    source, out = tmp_path / "incoming", tmp_path / "output"
    source.mkdir()
    for i in range(CATS):
        Image.fromarray(data.chelsea()).resize((300 + i, 224)).save(source / f"cat{i:03d}.png")
    config = tmp_path / "job.yaml"
    # parts of four images: the one read task at a time keeps ahead of the actors (each read waits a few tenths
    # of a second for a busy core), so queues build and the pool grows; parts of one image starved the actors
    # and Ray Data took the joining node's actor away, idle, before it had a part
    config.write_text(yaml.safe_dump({"source": str(source), "out": str(out), "input_size": 224,
                                      "batch_size": 1, "part_size": 4}))
    submit(cluster, "camlabel-night1", config, "--incremental", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("runs/*/annotations/part-*.parquet")):
        time.sleep(0.5)
    cluster["join"]()  # a node that registers once the run is under way, as a late GPU node would
    finished(cluster, "camlabel-night1")
    (first,) = out.glob("runs/*/manifest.json")
    manifest = json.loads(first.read_text())
    assert manifest["resources"]["actors"] == 1 and manifest["nodes"] == 2, manifest  # parts written on both nodes

    # the next night, over a grown source: parts written on either node count as done
    for i, photo in enumerate([data.coffee(), data.astronaut()]):
        Image.fromarray(photo).resize((128, 96)).save(source / f"night2_{i}.png")
    shutil.copy(source / "cat000.png", source / "night2_renamed_copy.png")  # same content, new name
    submit(cluster, "camlabel-night2", config, "--incremental")

    listing = subprocess.run([str(BIN / "camlabel"), "runs", str(out)], capture_output=True, text=True, check=True)
    runs = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [r["status"] for r in runs] == ["finished", "finished"]
    assert runs[0]["series"] == runs[1]["series"]
    assert [r["this_run"] for r in runs] == [CATS, 3]  # the second night read only its three new files
    assert [r["annotated"] for r in runs] == [CATS, 2]  # and kept the renamed copy out: its content is done
    assert [r["errors"] for r in runs] == [0, 1]  # a "duplicate" row names the image it copies

    coco = tmp_path / "all.json"
    subprocess.run([str(BIN / "camlabel"), "export-coco", str(out), "--out", str(coco)], check=True)
    names = sorted(Path(i["file_name"]).name for i in json.loads(coco.read_text())["images"])
    assert names == sorted([f"cat{i:03d}.png" for i in range(CATS)] + ["night2_0.png", "night2_1.png"])


def test_deploy_manifests_have_what_the_cluster_needs():
    rayjob = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("camlabel annotate") and "--config /config/job.yaml" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 900  # minutes
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no decode task lands on the head
    worker_pod = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker = worker_pod["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in worker_pod["tolerations"]) and worker_pod["nodeSelector"]
    for pod in (head["template"]["spec"], worker_pod):
        assert pod["securityContext"]["runAsNonRoot"] is True
        shm = [v for v in pod["volumes"] if v["name"] == "shm"][0]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"])
    assert any(m["mountPath"] == "/data" for m in worker["volumeMounts"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "wget" in dockerfile and "kubectl" in dockerfile and "\nUSER 1000" in dockerfile
    documents = list(yaml.safe_load_all((DEPLOY / "cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    assert {"ServiceAccount", "Role", "RoleBinding", "CronJob"} <= set(kinds)
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "camlabel-scheduler" and pod["securityContext"]["runAsNonRoot"] is True
    assert "bitnami" not in pod["containers"][0]["image"]
    assert "jobDeploymentStatus" in pod["containers"][0]["command"][-1]  # skips while a RayJob still runs
    assert "rayjobs" in kinds["Role"]["rules"][0]["resources"]
    from camlabel.schemas.config import load_config

    job = yaml.safe_load((DEPLOY / "job.yaml").read_text())
    assert load_config(None, {**job, "source": str(DEPLOY), "out": "/tmp/x"}).gpus_per_actor == 1
