"""The pool with real worker processes: timeouts, memory ceiling, crashes, teardown."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from geoiso_dagster.defs.resources import TASK_MODULE
from geoiso_dagster.errors import (
    BadInputError,
    MemoryLimitError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from geoiso_dagster.pool import PoolSettings, WorkerPool
from geoiso_dagster.pool.worker import owner_alive, start_ticks
from tests.conftest import require_osgeo


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_environment_reaches_gdal_and_proj(test_pool):
    facts = test_pool.run("environment").facts
    assert facts["pid"] != os.getpid()
    assert facts["env"]["GDAL_NUM_THREADS"] == "1"
    assert facts["env"]["PROJ_NETWORK"] == "OFF"
    assert facts["env"]["MALLOC_ARENA_MAX"] == "2"
    assert facts["gdal_config"]["GDAL_NUM_THREADS"] == 1
    assert facts["gdal_config"]["GDAL_CACHEMAX"] == 256
    assert facts["proj_network"] is False
    # The run process itself never got these: only the workers did.
    assert "GDAL_NUM_THREADS" not in os.environ


def test_osgeo_bindings_get_exceptions_and_config(test_pool):
    facts = test_pool.run("environment").facts
    if facts["osgeo"] is None:
        if require_osgeo():
            pytest.fail("GEOISO_REQUIRE_OSGEO=1 but the osgeo bindings are not importable")
        pytest.skip("osgeo bindings not installed (make test installs them)")
    assert facts["osgeo"]["use_exceptions"] is True
    assert facts["osgeo"]["cache_max_bytes"] == 256 * 2**20
    assert facts["osgeo"]["num_threads"] == "1"


def test_env_overrides_are_applied():
    settings = PoolSettings(
        task_module=TASK_MODULE,
        max_workers=1,
        gdal_cachemax_mb=64,
        env_overrides={"CPL_DEBUG": "ON"},
    )
    with WorkerPool(settings) as pool:
        facts = pool.run("environment").facts
    assert facts["gdal_config"]["GDAL_CACHEMAX"] == 64


def test_timeout_kills_the_worker_and_the_next_task_runs(test_pool):
    started = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match="task_timeout_s=3"):
        test_pool.run("hang_in_c", seconds=60)
    elapsed = time.monotonic() - started
    assert elapsed < 3 + 2, f"hung worker took {elapsed:.1f} s to be killed"
    assert test_pool.run("sleep", seconds=0).facts["slept"] == 0


def test_timed_out_worker_process_is_gone():
    settings = PoolSettings(
        max_workers=1, task_timeout_s=1, task_module="tests.standins.pool_tasks"
    )
    with WorkerPool(settings) as pool:
        future = pool.submit("hang_in_c", seconds=60)
        time.sleep(0.5)
        (busy,) = pool._workers  # the one worker registered itself when it started
        with pytest.raises(WorkerTimeoutError):
            future.result()
        deadline = time.monotonic() + 2
        while _alive(busy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(busy)


def test_a_task_no_worker_takes_is_not_left_waiting_forever():
    """Every worker stopped (SIGSTOP) before its next task: pebble's timeout starts only
    when a worker takes a task, so the task waited forever. Once tasks have waited a
    whole task_timeout_s with no worker taking one, they fail as timed out (transient:
    the step retries), the stopped workers are killed, and fresh ones take the next."""
    settings = PoolSettings(
        max_workers=2, task_timeout_s=2, task_module="tests.standins.pool_tasks"
    )
    with WorkerPool(settings) as pool:
        assert pool.run("sleep", seconds=0).facts["slept"] == 0
        deadline = time.monotonic() + 60  # both workers up (one still starting is no stall)
        while set(pool._workers) != set(pool._pebble_workers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = list(pool._pebble_workers().values())
        assert len(stopped) == 2 and set(pool._workers) == {p.pid for p in stopped}
        for process in stopped:
            process.suspend()
        try:
            started = time.monotonic()
            with pytest.raises(WorkerTimeoutError, match="no worker took it within task_timeo"):
                pool.submit("report_pid").result(timeout=30)
            waited = time.monotonic() - started
        finally:
            for process in stopped:
                if _alive(process.pid):
                    process.resume()
        assert 2 <= waited < 10, f"given up after {waited:.1f} s"
        assert not any(_alive(p.pid) for p in stopped), "the stopped workers are still there"
        assert pool.run("report_pid").facts["pid"] not in {p.pid for p in stopped}


def test_memory_ceiling_stops_the_worker_and_names_the_limit():
    """Its own pool, with a timeout far past the allocation: on a loaded machine touching
    500 MB page by page once took longer than the shared pool's 3 s timeout, which then
    stopped the task before the ceiling could."""
    settings = PoolSettings(
        max_workers=1,
        task_timeout_s=120,
        memory_limit_mb=500,
        task_module="tests.standins.pool_tasks",
    )
    with WorkerPool(settings) as pool:
        with pytest.raises(MemoryLimitError) as info:
            pool.run("allocate", megabytes=900, hold_s=10)
        message = str(info.value)
        assert "memory_limit_mb=500" in message
        assert "MB of memory" in message
        assert pool.run("sleep", seconds=0).facts["slept"] == 0


def test_address_space_backstop_turns_a_huge_allocation_into_a_memory_error(test_pool):
    with pytest.raises(MemoryLimitError, match="address-space backstop.*memory_limit_mb=500"):
        test_pool.run("allocate_at_once", megabytes=64 * 1024)
    assert test_pool.run("sleep", seconds=0).facts["slept"] == 0


def test_task_within_the_ceiling_reports_its_peak(test_pool):
    result = test_pool.run("allocate", megabytes=200, hold_s=0.2)
    assert result.peak_rss_mb > 200
    assert result.peak_rss_mb < 500


@pytest.mark.parametrize(("task", "signame"), [("abort", "SIGABRT"), ("segfault", "SIGSEGV")])
def test_crash_names_the_signal_and_the_pool_recovers(test_pool, task, signame):
    with pytest.raises(WorkerCrashedError, match=signame):
        test_pool.run(task)
    assert test_pool.run("sleep", seconds=0).facts["slept"] == 0


def test_oom_kill_is_reported_as_a_crash(test_pool):
    with pytest.raises(WorkerCrashedError, match="SIGKILL"):
        test_pool.run("kill_self", signum=signal.SIGKILL)


def test_bad_input_comes_back_as_bad_input(test_pool, tmp_path):
    with pytest.raises(BadInputError) as info:
        test_pool.run("ingest", source=str(tmp_path / "nope.gpkg"), output=str(tmp_path / "o"))
    assert info.value.path == str(tmp_path / "nope.gpkg")


def test_workers_know_their_owner_across_a_step_of_the_wall_clock(monkeypatch):
    """A step of the wall clock (NTP, a virtual machine restored or forked) moves the boot
    time psutil adds to every create_time read afterwards: an owner identified by its
    create_time looked dead to every worker started after the step, and they all left
    with their tasks unrun. The owner check counts clock ticks since boot instead."""
    import psutil._pslinux

    me = os.getpid()
    ticks, created = start_ticks(me), psutil.Process(me).create_time()
    booted = psutil._pslinux.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: booted + 3600.0)
    assert psutil.Process(me).create_time() != created  # what the old check compared
    assert owner_alive(me, ticks)
    assert not owner_alive(me, ticks + 1) and start_ticks(2**22 + 1) is None


def test_a_pool_is_told_its_task_module_by_its_caller():
    """The pool names no task module of its own: a bare task name needs one given; a
    qualified reference needs none."""
    with WorkerPool(PoolSettings(max_workers=1)) as pool:
        with pytest.raises(ValueError, match="'environment' names no module"):
            pool.run("environment")
        facts = pool.run("geoiso_dagster.spatial.tasks:environment").facts
    assert facts["gdal_config"]["GDAL_NUM_THREADS"] == 1


def test_fresh_worker_per_task_and_recycling():
    with WorkerPool(
        PoolSettings(task_module=TASK_MODULE, max_workers=1, max_tasks_per_worker=1)
    ) as pool:
        pids = {pool.run("environment").pid for _ in range(3)}
    assert len(pids) == 3
    with WorkerPool(
        PoolSettings(task_module=TASK_MODULE, max_workers=1, max_tasks_per_worker=0)
    ) as pool:
        pids = {pool.run("environment").pid for _ in range(3)}
    assert len(pids) == 1


def test_spawn_start_method_works():
    with WorkerPool(
        PoolSettings(task_module=TASK_MODULE, max_workers=1, start_method="spawn")
    ) as pool:
        facts = pool.run("environment").facts
    assert facts["gdal_config"]["GDAL_NUM_THREADS"] == 1


def test_async_fan_out_runs_tasks_in_parallel(test_pool):
    async def main():
        return await asyncio.gather(*(test_pool.run_async("sleep", seconds=1.0) for _ in range(2)))

    a, b = (r.facts for r in asyncio.run(main()))
    assert a["slept"] == b["slept"] == 1.0
    assert a["pid"] != b["pid"]
    # The two sleeps overlapped in time (timestamps taken inside the workers).
    assert max(a["started"], b["started"]) < min(a["ended"], b["ended"])


def test_every_message_a_task_sends_is_delivered_before_its_result(test_pool):
    """A task that sends 300 messages and returns at once, to a caller slow to take them
    (as a busy run process is): the event channel holds 10 datagrams
    (net.unix.max_dgram_qlen), so most are refused, and the result comes first. Each
    message still reaches the callback, once, before the future settles."""
    got: list[str] = []

    def slow(event: dict) -> None:
        time.sleep(0.002)
        got.append(event["message"])

    result = test_pool.submit("burst_progress", count=300, on_progress=slow).result()
    assert result.facts == {"sent": 300}
    assert sorted(got, key=lambda m: int(m.split()[1])) == [f"message {i}" for i in range(300)]


def test_cancel_returns_once_nothing_of_the_cancelled_tasks_runs(unconfined_pool, tmp_path):
    """Two tasks running, two waiting for a worker: once cancel() returns, the workers of
    the running ones are gone (not only told to stop), and the waiting ones never run,
    also when a worker picks them up after the cancel. What a step removes after a
    cancel (a fan-out's part files) can then never be written again. (Unconfined: the
    tasks write marker files where the test reads them; a confined task's output is moved
    by its worker after it, which a killed worker never does.)"""
    test_pool = unconfined_pool
    paths = [tmp_path / f"task{i}" for i in range(4)]
    futures = [test_pool.submit("sleep_then_write", seconds=1.5, path=str(p)) for p in paths]
    deadline = time.monotonic() + 20
    while not all(Path(f"{p}.started").exists() for p in paths[:2]):
        assert time.monotonic() < deadline, "the first two tasks never started"
        time.sleep(0.01)
    pids = [int(Path(f"{p}.started").read_text() or 0) for p in paths[:2]]
    test_pool.cancel(futures)
    assert all(f.cancelled() for f in futures)
    assert [_alive(pid) for pid in pids] == [False, False]
    time.sleep(2.0)  # longer than a task would take, had any of them gone on or started
    assert [p.exists() for p in paths] == [False] * 4
    assert [Path(f"{p}.started").exists() for p in paths[2:]] == [False, False]
    assert test_pool.run("report_pid").facts["pid"] not in pids  # the pool goes on


_TEARDOWN_SCRIPT = """
import json, time, psutil
from geoiso_dagster.pool import PoolSettings, WorkerPool

def children():
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            # multiprocessing's resource tracker: one per process, exits with it, runs no task
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(p.pid)
    return found

pool = WorkerPool(PoolSettings(max_workers=2, task_module="tests.standins.pool_tasks")).start()
futures = [pool.submit("hang_in_c", seconds=60) for _ in range(2)]
time.sleep(2)
during = children()
pool.close()
print(json.dumps({"during": during, "after": children(),
                  "settled": all(f.done() for f in futures),
                  "errors": [type(f.exception(timeout=0)).__name__ for f in futures]}))
"""


def test_teardown_during_a_running_task_leaves_no_process():
    """In a fresh process, so no other pool's workers blur the count."""
    out = subprocess.run(
        [sys.executable, "-c", _TEARDOWN_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["during"]) >= 3  # the forkserver and two busy workers
    assert report["after"] == []
    assert report["settled"]  # nobody waiting on a task is left hanging
    assert report["errors"] == ["WorkerCrashedError"] * 2


def _left_after_killing_the_run(script: str, stop: bool = False, wait_s: float = 10) -> list:
    """Run `script` (a run process that prints the pids to watch on one line), SIGSTOP
    those pids if `stop`, SIGKILL the run process, and return the pids still there after
    `wait_s` (killed then, so that a failure leaves nothing behind)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids), pids
    for pid in pids if stop else ():
        os.kill(pid, signal.SIGSTOP)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def test_workers_die_when_the_run_process_is_killed(tmp_path):
    """SIGKILL gives the run process no chance to tear down: workers must notice."""
    script = textwrap.dedent(
        """
        import sys, time
        from geoiso_dagster.pool import PoolSettings, WorkerPool
        settings = PoolSettings(max_workers=1, task_module="tests.standins.pool_tasks")
        pool = WorkerPool(settings).start()
        pool.submit("report_pid")
        future = pool.submit("hang_in_c", seconds=120)
        time.sleep(1.5)
        print(" ".join(str(p) for p in pool._workers), flush=True)
        time.sleep(120)
        """
    )
    assert not _left_after_killing_the_run(script, wait_s=5), "a worker outlived its run"


def test_a_worker_holding_the_gil_dies_with_its_run_process():
    """A worker inside a long C call that holds the GIL cannot run its own watchdog: the
    kernel kills it when its parent (the forkserver, which sees the run process go) dies."""
    script = textwrap.dedent(
        """
        import time
        from geoiso_dagster.pool import PoolSettings, WorkerPool
        settings = PoolSettings(max_workers=1, task_module="tests.standins.pool_tasks")
        pool = WorkerPool(settings).start()
        pool.run("report_pid")
        pool.submit("hold_gil", seconds=120)
        time.sleep(1.5)
        print(" ".join(str(p) for p in pool._workers), flush=True)
        time.sleep(120)
        """
    )
    assert not _left_after_killing_the_run(script), (
        "a worker in a GIL-holding call outlived its run"
    )


def test_stopped_workers_and_forkserver_die_with_their_run_process():
    """Every worker and the forkserver stopped (SIGSTOP), then the run process killed:
    nothing of them can run to notice, and they stayed until someone continued them. The
    kernel kills each when its parent goes (PR_SET_PDEATHSIG; the forkserver's parent is
    the run process's keeper thread), stopped or not."""
    script = textwrap.dedent(
        """
        import multiprocessing.forkserver, time
        from geoiso_dagster.pool import PoolSettings, WorkerPool
        settings = PoolSettings(max_workers=2, task_module="tests.standins.pool_tasks")
        pool = WorkerPool(settings).start()
        pool.run("report_pid")
        time.sleep(1.5)
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        print(server, " ".join(str(p) for p in pool._workers), flush=True)
        time.sleep(120)
        """
    )
    left = _left_after_killing_the_run(script, stop=True)
    assert not left, f"still there, stopped: {left}"


def test_helpers_a_task_starts_end_with_it(unconfined_pool, tmp_path, monkeypatch):
    """A task's helper processes (a subprocess, one double-forked away) are killed when
    the task returns, and said so; those of a task that times out die with its worker.
    (With the sandbox off: a confined task can start no program, test_sandbox.py.)"""
    result = unconfined_pool.run("start_helper", seconds=120)
    pids = result.facts
    assert not _alive(pids["helper"]) and not _alive(pids["double_forked"])
    assert "2 helper processes it left running (killed)" in result.restored


def test_helpers_of_a_timed_out_task_die_with_its_worker(tmp_path):
    record = tmp_path / "helpers.json"
    settings = PoolSettings(
        max_workers=1,
        task_timeout_s=3,
        task_module="tests.standins.pool_tasks",
        env_overrides={"GEOISO_TEST_HELPERS": str(record)},
        sandbox="off",  # it starts programs
    )
    with WorkerPool(settings) as pool:
        with pytest.raises(WorkerTimeoutError):
            pool.run("start_helper", seconds=120, hang=True)
        pids = json.loads(record.read_text())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids.values()), pids


def test_workers_do_not_rerun_the_parents_main_module(tmp_path):
    """Under the dagster CLI the run process's __main__ imports Dagster; a worker must not
    re-run it (multiprocessing would, costing ~750 ms per fresh worker)."""
    script = tmp_path / "main_with_dagster.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            import dagster  # noqa: F401 - what the dagster CLI's main module does
            from geoiso_dagster.pool import PoolSettings, WorkerPool

            if __name__ == "__main__":
                stand_ins = "tests.standins.pool_tasks"
                with WorkerPool(PoolSettings(max_workers=1, task_module=stand_ins)) as p:
                    print(json.dumps(p.run("loaded_modules", names=["dagster"]).facts))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"dagster": False}


def test_what_a_task_changes_in_its_worker_is_undone_before_the_next(tmp_path):
    """Workers are reused across the files of a run: what one file's task left changed
    in the process (environment, GDAL options, folder, umask) never reaches the next.
    (With the sandbox off: a confined task runs in a process of its own, gone after it.)"""
    settings = PoolSettings(
        max_workers=1, task_module="tests.standins.pool_tasks", gdal_cachemax_mb=64, sandbox="off"
    )
    with WorkerPool(settings) as pool:
        before = pool.run("look_at_state")
        careless = pool.run("leave_state_behind", folder=str(tmp_path))
        after = pool.run("look_at_state")
    assert before.pid == careless.pid == after.pid  # the same worker served all three
    assert after.facts == before.facts
    assert str(before.facts["cachemax"]) == "64" and before.facts["left_behind"] is None
    assert set(careless.restored) == {
        "environment variable GEOISO_LEFT_BEHIND",
        "environment variable GDAL_NUM_THREADS",
        "working folder",
        "umask",
        "GDAL option OGR_GEOJSON_MAX_OBJ_SIZE",
        "GDAL option GDAL_CACHEMAX",
    }
    assert before.restored == after.restored == ()


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"max_workers": 4 * len(os.sched_getaffinity(0)) + 1}, "max_workers="),
        ({"memory_limit_mb": 1_000_000}, "memory_limit_mb=1000000 is out of its bounds [64,"),
        ({"address_space_headroom_mb": 0}, "address_space_headroom_mb=0 is out of its bounds"),
        (
            {"task_timeout_s": 1e12},
            "task_timeout_s=1000000000000.0 is out of its bounds [0.5,",
        ),
        ({"gdal_cachemax_mb": 8192, "memory_limit_mb": 1024}, "gdal_cachemax_mb=8192"),
    ],
    ids=["workers", "memory", "no-backstop", "timeout", "gdal-cache"],
)
def test_pool_settings_from_run_config_are_bounded(setting, named, tmp_path):
    """Whoever can launch a run sets the pool's fields: out of bounds, the run fails at
    once, naming the setting and its bounds, and no worker starts."""
    with pytest.raises(ValueError, match=re.escape(named)):
        PoolSettings(**setting)
    from dagster import instance_for_test, materialize

    from geoiso_dagster.defs.assets import geo_assets
    from geoiso_dagster.defs.partitions import source_files
    from geoiso_dagster.defs.resources import SpatialWorkerPool

    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_files.name, ["x.gpkg"])
        result = materialize(
            geo_assets,
            instance=instance,
            selection=["raw_features"],
            partition_key="x.gpkg",
            resources={"spatial_pool": SpatialWorkerPool()},
            run_config={"resources": {"spatial_pool": {"config": setting}}},
            raise_on_error=False,
        )
    assert not result.success
    text = " ".join(str(e.event_specific_data) for e in result.all_events if e.is_failure)
    assert named in text, text
