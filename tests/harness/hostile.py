"""A worker taken over by a hostile file, staged (tests/test_sandbox.py, and in a run
container by tests/test_deploy.py: `python -m tests.harness.hostile` prints what happened
as JSON). Needs the project and psutil only, not pytest.
"""

import json
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from geoiso_dagster.pool import PoolSettings, WorkerPool

HOSTILE = "tests.standins.hostile_tasks:take_over"


class Listener:
    """A TCP server of the test on 127.0.0.1 that counts who connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def targets_in(tmp_path: Path, root: Path) -> dict:
    """What the hostile task aims at: made here, each with a content to check afterwards."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    home = tmp_path / "dagster_home"
    (home / "storage").mkdir(parents=True)
    db = home / "storage" / "runs.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table runs (id text)")
    other_source = root / "inbox" / "other.gpkg"
    other_source.write_bytes(b"another partition's source")
    other_output = root / "warehouse" / "raw_features" / "other.gpkg.parquet"
    other_output.parent.mkdir(parents=True, exist_ok=True)
    other_output.write_bytes(b"another partition's output")
    return {
        "secret": str(secret),
        "other_source": str(other_source),
        "other_output": str(other_output),
        "instance_db": str(db),
        "dagster_home": str(home),
        "write_outside": str(outside / "planted"),
    }


def take_over(pool: WorkerPool, source: Path, output: Path, port: int, bucket_port: int = 0):
    forkserver, workers = forkserver_and_workers(pool, 2)
    pids = {"run": os.getpid(), "forkserver": forkserver, "workers": workers}
    result = pool.run(
        HOSTILE,
        source=str(source),
        output=str(output),
        pids=pids,
        port=port,
        bucket_port=bucket_port,
    )
    return result, pids


def forkserver_and_workers(pool: WorkerPool, count: int) -> tuple[int, list[int]]:
    """The pool's forkserver (the parent of the worker that runs a first task) and its
    `count` workers."""
    worker = pool.run("tests.standins.pool_tasks:report_pid").pid
    forkserver = psutil.Process(worker).ppid()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = [w.pid for w in psutil.Process(forkserver).children()]
        if len(workers) >= count:
            return forkserver, workers
        time.sleep(0.05)
    raise AssertionError("the pool's workers never showed")


def untouched(targets: dict, pids: dict) -> list[str]:
    """What the task changed of what it aimed at ([]: nothing)."""
    changed = []
    if Path(targets["write_outside"]).exists():
        changed.append("a file planted outside its folder")
    if Path(targets["other_output"]).read_bytes() != b"another partition's output":
        changed.append("another partition's output")
    if Path(targets["other_source"]).read_bytes() != b"another partition's source":
        changed.append("another partition's source")
    for pid in [pids["forkserver"], *pids["workers"]]:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            changed.append(f"process {pid} killed")
    return changed


def main() -> None:
    """The local-root case in this process (a run container's): JSON on stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "data"
        (root / "inbox").mkdir(parents=True)
        os.environ["GEOISO_DATA_ROOT"] = str(root)
        targets = targets_in(tmp_path, root)
        source = root / "inbox" / "mine.gpkg"
        source.write_bytes(b"its own source")
        output = root / "warehouse" / "raw_features" / "mine.gpkg.parquet"
        listener = Listener()
        settings = PoolSettings(
            max_workers=2,
            task_timeout_s=60,
            memory_limit_mb=512,
            env_overrides={
                "GEOISO_TEST_HOSTILE": json.dumps(targets),
                "DAGSTER_HOME": targets["dagster_home"],
            },
        )
        try:
            with WorkerPool(settings) as pool:
                result, pids = take_over(pool, source, output, listener.port, bucket_port=1)
                changed = untouched(targets, pids)
        finally:
            listener.close()
        json.dump(
            {
                "attempts": result.facts["attempts"],
                "sandbox": result.sandbox,
                "changed": changed,
                "connections": listener.connections,
            },
            sys.stdout,
        )


if __name__ == "__main__":
    main()
