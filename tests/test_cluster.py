"""`trapedge batch --cluster` on Ray's own two-node local cluster (loopback only): per-card outputs identical to
`trapedge run`, and a worker SIGKILLed mid-chunk retried by Ray with nothing lost or doubled."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray then binds every node to 127.0.0.1

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - the cluster extra is installed in CI; its absence must fail here, not skip
from ray.cluster_utils import Cluster

from test_batch import CARDS, DEPLOYMENT, assert_same_as_run, bundle, cards, cli, reference  # noqa: F401
from trapedge.runtime.season.shards import SHARDS, runs


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on 127.0.0.1, one CPU each, started and stopped here."""
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    local = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    local.add_node(**node)
    local.wait_for_nodes()
    yield local
    local.shutdown()


def test_batch_on_a_two_node_ray_cluster_equals_run(tmp_path: Path, cluster, bundle: Path, cards: Path,
                                                    reference: Path) -> None:
    season = tmp_path / "season"
    cli("batch", str(cards), "--bundle", str(bundle), "--out", str(season), "--chunk", "1", "--cluster",
        cluster.address, *DEPLOYMENT, "-q")
    assert_same_as_run(season, reference, CARDS)
    pids = {pid for name in CARDS for _, _, pid in runs(season / name)}
    assert len(pids) == 2, "one actor per node ran chunks"
    assert (season / "camtrap-dp" / "datapackage.json").is_file() and (season / "summary.csv").is_file()


def _kill_first_chunk_worker(season: Path, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILLs the process writing the first chunk shard seen (its temp name carries its pid)."""
    while not stop.is_set():
        for temp in season.glob(f"*/{SHARDS}/.chunk-*.tmp"):
            pid = int(temp.name.split(".")[-2])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
            return
        time.sleep(0.01)


def test_a_worker_killed_mid_chunk_is_retried_with_identical_outputs(tmp_path: Path, cluster, bundle: Path,
                                                                      cards: Path, reference: Path) -> None:
    season, size = tmp_path / "season", 3
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_chunk_worker, args=(season, stop, killed), daemon=True)
    watcher.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "trapedge.runtime.cli", "batch", str(cards), "--bundle",
                               str(bundle), "--out", str(season), "--chunk", str(size), "--cluster",
                               cluster.address, *DEPLOYMENT, "-q"], capture_output=True, text=True, timeout=150)
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(killed) == 1, "no worker was caught mid-chunk"
    assert_same_as_run(season, reference, CARDS)
    done = [(name, r) for name in CARDS for r in runs(season / name)]
    chunks = sum(-(-n // size) for n in CARDS.values())
    assert {(name, r[0]) for name, r in done} == {(name, i) for name in CARDS for i in range(-(-CARDS[name] // size))}
    assert chunks <= len(done) <= chunks + 1, "a chunk ran more than once beyond the killed attempt"
    assert killed[0] not in {r[2] for _, r in done} or len(done) == chunks + 1
    assert not list(season.glob(f"*/{SHARDS}/*.tmp")) and not list(season.glob(f"*/{SHARDS}/chunk-*.sqlite"))
