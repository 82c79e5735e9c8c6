"""The kernel's sandbox around every task (pool/sandbox.py, docs/security.md).

A task plays code execution inside a worker after a parser bug
(tests/standins/hostile_tasks.py) and tries to reach what such code would want; the
kernel must refuse every attempt, for a local root and for a bucket root, and what it
aimed at must be left as it was.
"""

import json
import os

import pytest

from geoiso_dagster.errors import TaskError
from geoiso_dagster.pool import PoolSettings, WorkerPool, sandbox
from tests.harness.hostile import Listener, take_over, targets_in, untouched


def _assert_refused(attempts: dict, allowed: set[str]) -> None:
    for what, outcome in attempts.items():
        if what in allowed:
            assert outcome == "ALLOWED", (what, outcome)
        else:
            assert outcome.startswith("refused ("), (what, outcome)


def test_a_worker_taken_over_reaches_nothing_with_a_local_root(data_root, tmp_path):
    targets = targets_in(tmp_path, data_root)
    source = data_root / "inbox" / "mine.gpkg"
    source.write_bytes(b"its own source")
    output = data_root / "warehouse" / "raw_features" / "mine.gpkg.parquet"
    listener = Listener()
    settings = PoolSettings(
        max_workers=2,
        task_timeout_s=60,
        sandbox="on",
        env_overrides={
            "GEOISO_TEST_HOSTILE": json.dumps(targets),
            "DAGSTER_HOME": targets["dagster_home"],
        },
    )
    try:
        with WorkerPool(settings) as pool:
            result, pids = take_over(pool, source, output, listener.port, bucket_port=1)
            attempts = result.facts["attempts"]
            _assert_refused(attempts, allowed={"its own input", "its own output"})
            assert result.sandbox.startswith("on: Landlock ABI"), result.sandbox
            assert "no network" in result.sandbox
            assert untouched(targets, pids) == []
            # its output, moved by the worker from its private folder to the name asked
            assert output.read_bytes() == b"made in the sandbox"
            assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]
            assert pool.run("tests.standins.pool_tasks:report_pid").facts  # it goes on
    finally:
        listener.close()
    assert listener.connections == 0


def test_a_worker_taken_over_reaches_only_the_bucket_with_a_bucket_root(s3_root, tmp_path):
    """A bucket root's tasks may connect to the endpoint's port, and no other."""
    mirror = tmp_path / "mirror-root"
    (mirror / "inbox").mkdir(parents=True)
    targets = targets_in(tmp_path, mirror)
    source = mirror / "inbox" / "mine.gpkg"
    source.write_bytes(b"its own source")
    output = tmp_path / "scratch" / "mine.gpkg.parquet"
    output.parent.mkdir(parents=True, exist_ok=True)
    listener = Listener()
    settings = PoolSettings(
        max_workers=2,
        task_timeout_s=60,
        sandbox="on",
        env_overrides={
            "GEOISO_TEST_HOSTILE": json.dumps(targets),
            "DAGSTER_HOME": targets["dagster_home"],
        },
    )
    try:
        with WorkerPool(settings) as pool:
            port = s3_root.server.port
            result, pids = take_over(pool, source, output, listener.port, bucket_port=port)
            attempts = result.facts["attempts"]
            _assert_refused(
                attempts,
                allowed={
                    "its own input",
                    "its own output",
                    "a TCP connection to the bucket's port",
                },
            )
            assert f"TCP to port {port} only" in result.sandbox
            assert untouched(targets, pids) == []
    finally:
        listener.close()
    assert listener.connections == 0


def test_a_task_that_cannot_be_confined_does_not_run(monkeypatch):
    """The self-check: a process that is not confined is told so, probe by probe (here, a
    process the test does not confine: the check's own proof that it can fail)."""
    policy = sandbox.decide("on")
    found = sandbox.weaknesses(policy, os.getppid())
    assert any(w.startswith("listing /") for w in found), found
    assert any(w.startswith("seccomp") for w in found), found
    assert any(w.startswith("signalling") for w in found), found


def test_on_refuses_a_kernel_without_landlock_and_auto_says_it_is_off(monkeypatch):
    monkeypatch.setattr(sandbox, "support", lambda: "the kernel's Landlock ABI is 3")
    with pytest.raises(sandbox.SandboxError, match="GEOISO_POOL_SANDBOX=off"):
        sandbox.decide("on")
    assert sandbox.decide("auto").summary == "off: the kernel's Landlock ABI is 3"
    assert sandbox.decide("off").summary == "off: GEOISO_POOL_SANDBOX=off"


def test_the_sandbox_off_is_said_for_every_task(tmp_path):
    settings = PoolSettings(max_workers=1, sandbox="off", task_module="tests.standins.pool_tasks")
    with WorkerPool(settings) as pool:
        assert pool.run("report_pid").sandbox == "off: GEOISO_POOL_SANDBOX=off"


def test_a_confined_task_that_crashes_is_a_crash_of_its_worker(test_pool):
    """A segfault in the task's process is judged as a worker's crash, and the pool goes
    on (its worker ends by the same signal)."""
    from geoiso_dagster.errors import WorkerCrashedError

    with pytest.raises(WorkerCrashedError):
        test_pool.run("segfault")
    assert test_pool.run("sleep", seconds=0).facts["slept"] == 0


def test_what_a_confined_task_tells_is_data_never_pickled(tmp_path):
    """A task's outcome crosses from its process to its worker as JSON: facts that are
    not plain data are refused with a clear error, not pickled."""
    settings = PoolSettings(max_workers=1, sandbox="on", task_module="tests.standins.pool_tasks")
    with WorkerPool(settings) as pool:
        with pytest.raises(TaskError, match="not plain data"):
            pool.run("return_an_object")
