"""The bulk-job scenario of tests/bulk/test_ray_job.py (no tests here), run as
``python -m tests.bulk.ray_cluster WORKDIR CHECKPOINT IMAGES`` inside a network namespace that has
nothing but loopback (``tests.ray_namespace``).

It starts a real two-node Ray cluster (``ray.cluster_utils.Cluster``: a GCS and a raylet per
node, 2 CPUs each) and runs ``transfiner predict --engine ray --replicas 2`` against it as a
subprocess, three times over the same folder of images:

- whole: to its end, with overlays, watching on which nodes Ray Data puts the replicas;
- too small: three replicas that the cluster cannot hold, refused before the job starts;
- resumed: its driver SIGKILLed once two shards are committed, then run again with ``--resume``;
- node lost: the second node's raylet killed (``remove_node``, not graceful) once a shard is
  committed; if the job fails, a node is added back and the job resumed.

It records what it saw in WORKDIR/report.json; the test asserts on that and on the output folders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.ray_namespace import wait_for
from transfiner.bulk.shards import SHARD

SEGMENTER_CLASS = "MapWorker(MapBatches(Segmenter))"  # Ray Data's actor class for our replicas


class Scenario:
    def __init__(self, workdir: Path, checkpoint: Path, images: Path, address: str) -> None:
        self.workdir, self.checkpoint, self.images, self.address = workdir, checkpoint, images, address

    def predict(self, name: str, out: str, *flags: str) -> subprocess.Popen:
        """``transfiner predict --engine ray`` into WORKDIR/out, its output in WORKDIR/name.log."""
        log = (self.workdir / f"{name}.log").open("w")
        command = [sys.executable, "-m", "transfiner", "predict", str(self.images), "--engine", "ray"]
        command += ["--ray-address", self.address, "--model", str(self.checkpoint), "--out", str(self.workdir / out)]
        command += ["--score-threshold", "0", "--replicas", "2", "--replica-cpus", "1.5", "--shard-size", "4", *flags]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def shards(self, out: str) -> int:
        return sum(bool(SHARD.fullmatch(p.name)) for p in (self.workdir / out).glob("part-*.jsonl"))

    def finish(self, job: subprocess.Popen, timeout: float = 240) -> int | str:
        try:
            return job.wait(timeout)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()
            return "timeout"


def _replica_nodes() -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", SEGMENTER_CLASS), ("state", "=", "ALIVE")], detail=True)
    return {actor.node_id for actor in actors}


def _whole(scenario: Scenario, report: dict) -> None:
    job = scenario.predict(
        "whole",
        "whole",
        "--coco-results",
        str(scenario.workdir / "whole.json"),
        "--overlay",
        str(scenario.workdir / "overlays"),
    )
    nodes: set[str] = set()
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        try:
            nodes |= _replica_nodes()
        except Exception:  # noqa: BLE001 (the state API answers late while actors start)
            pass
        time.sleep(2)  # the state API is a query to the GCS: often, it slows the job it watches
    report["whole"] = {"exit": scenario.finish(job, 1), "replica_nodes": sorted(nodes)}


def _resumed(scenario: Scenario, report: dict) -> None:
    job = scenario.predict("killed", "resumed")
    committed = wait_for(lambda: scenario.shards("resumed") >= 2 or job.poll() is not None, 240)
    shards = scenario.shards("resumed")
    job.send_signal(signal.SIGKILL)
    report["resumed"] = {"shards_before_kill": shards, "killed_while_running": bool(committed) and job.poll() is None}
    job.wait()
    report["resumed"]["exit"] = scenario.finish(scenario.predict("resume", "resumed", "--resume"))


def _too_small(scenario: Scenario, report: dict) -> None:
    """Three replicas of 1.5 CPUs on two nodes of 2: refused up front, not left waiting."""
    job = scenario.predict("too-small", "too-small", "--replicas", "3")
    report["too_small"] = {"exit": scenario.finish(job, 120), "committed": scenario.shards("too-small")}


def _node_lost(scenario: Scenario, report: dict, cluster, worker) -> None:
    job = scenario.predict("node-lost", "node-lost")
    wait_for(lambda: scenario.shards("node-lost") >= 1 or job.poll() is not None, 240)
    report["node_lost"] = {"shards_before": scenario.shards("node-lost"), "running": job.poll() is None}
    cluster.remove_node(worker, allow_graceful=False)
    report["node_lost"]["exit"] = exit_code = scenario.finish(job)
    if exit_code != 0:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        report["node_lost"]["resume_exit"] = scenario.finish(scenario.predict("node-resume", "node-lost", "--resume"))


def run(workdir: Path, checkpoint: Path, images: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    report: dict = {"timeline": {}}
    started = time.monotonic()

    def mark(name: str) -> None:
        report["timeline"][name] = round(time.monotonic() - started, 2)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        report["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        mark("cluster")
        scenario = Scenario(workdir, checkpoint, images, cluster.address)
        _whole(scenario, report)
        mark("whole")
        _too_small(scenario, report)
        mark("too_small")
        _resumed(scenario, report)
        mark("resumed")
        _node_lost(scenario, report, cluster, worker)
        mark("node_lost")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


def main() -> None:
    workdir = Path(sys.argv[1])
    report = run(workdir, Path(sys.argv[2]), Path(sys.argv[3]))
    (workdir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
