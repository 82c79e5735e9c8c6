"""The production topology, live: `scripts/stack.sh up` (PostgreSQL, dockerd, the image,
`dagster code-server start`, webserver, daemon) with deploy/dagster.yaml, every run in
its own container of geoiso-dagster:latest; then the faults of a deployment; then
`scripts/stack.sh down`, which must leave no process and no container running.

The tests run in file order against one stack (each leaves it healthy for the next).
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

import geopandas
import psutil
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance
from dagster import DagsterRunStatus as Status

from geoiso_dagster.defs.assets import ASSET_NAMES
from geoiso_dagster.paths import output_path
from tests.harness.deploy import DockerEngine, Postgres, Stack, containers, inspect
from tests.harness.live import FAST_INBOX, launch_params

pytestmark = pytest.mark.timeout(900)

MAX_WORKERS, CEILING_MB, RUN_PROCESS_MB = 2, 1024, 768  # deploy/dagster.yaml
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A Docker engine (started if none runs) and the image of the code as it is now."""
    engine = DockerEngine(tmp_path_factory.mktemp("docker")).start()
    seconds = engine.build_image()
    print(f"make image (layers cached where the code did not change): {seconds:.0f} s")
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def stack(engine):
    # Under /tmp and not pytest's 0700 tree: the cluster belongs to `nobody` as root.
    folder = Path(tempfile.mkdtemp(prefix="geoiso-stack-"))
    pool = {
        "GEOISO_POOL_MAX_WORKERS": str(MAX_WORKERS),
        "GEOISO_POOL_MEMORY_LIMIT_MB": str(CEILING_MB),
    }
    # The OOM test's fault: the run containers get GEOISO_* variables from the stack; the
    # fault fires once, while the test arms it.
    state, armed = folder / "data" / "fault-state-oom", folder / "data" / "oom-armed"
    fault = {"task": "ingest", "at": "start", "fault": "memory", "times": 1, "state": str(state)}
    faults = {"GEOISO_FAULTS": json.dumps([fault | {"armed": str(armed)}])}
    stack = Stack(folder, folder / "data", **FAST_INBOX, **pool, **faults)
    stack.oom_armed = armed
    started = time.monotonic()
    printed = stack.script("up")
    stack.up_s = time.monotonic() - started
    assert f"up: {stack.url}" in printed
    try:
        yield stack
    finally:
        processes = stack.processes()
        assert processes, "the stack's processes were found while it ran"
        printed = stack.script("down")
        still = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        running = containers("label=geoiso-dagster=run")
        shutil.rmtree(folder, ignore_errors=True)
    assert still == [], f"processes left by stack.sh down: {still}"
    assert running == [], f"containers left by stack.sh down: {running}"


def _drop(stack: Stack, source: Path, name: str) -> float:
    inbox = stack.data_root / "inbox"
    shutil.copy(source, inbox / f".{name}.part")
    os.rename(inbox / f".{name}.part", inbox / name)
    return time.monotonic()


def _instance(stack: Stack) -> DagsterInstance:
    """The stack's instance, opened with its environment; this process's stays as it was
    (the tests after this module must not inherit a DAGSTER_HOME that is gone)."""
    with mock.patch.dict(os.environ, stack.instance_env):
        return DagsterInstance.get()


def _runs_of(instance: DagsterInstance, partition: str):
    return [r for r in instance.get_runs() if r.tags.get("dagster/partition") == partition]


def _wait(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout} s")


def _finished(instance: DagsterInstance, run_id: str) -> Status | None:
    run = instance.get_run_by_id(run_id)
    return run.status if run.is_finished else None


def _sensor_run_and_container(stack: Stack, partition: str) -> tuple:
    """(instance, run, its container's `docker inspect`) of the sensor's one run of
    `partition`, once that run has finished successfully."""
    instance = _instance(stack)
    (run,) = _wait(lambda: _runs_of(instance, partition), 30, "the sensor's run")
    assert _wait(lambda: _finished(instance, run.run_id), 120, "the run") == Status.SUCCESS
    run = instance.get_run_by_id(run.run_id)
    return instance, run, inspect(run.tags["docker/container_id"])


def _launch(
    stack: Stack, partition: str, tags: dict | None = None, run_config: dict | None = None
) -> str:
    params = launch_params(partition, run_config, tags=tags)
    launched = stack.graphql(LAUNCH, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def _countries(naturalearth_shp: Path, folder: Path, name: str, copies: int = 1) -> Path:
    """Natural Earth countries keyed by continent; `copies` > 1 repeats them (each row
    numbered in `rank`) to make a file that takes the workers some seconds."""
    frame = geopandas.read_file(naturalearth_shp)
    frame["region_id"] = frame["continent"]
    if copies > 1:
        frame = geopandas.GeoDataFrame(
            [row for _ in range(copies) for row in frame.itertuples(index=False)],
            columns=frame.columns,
            crs=frame.crs,
        )
        frame["rank"] = range(len(frame))
    path = folder / name
    frame.to_file(path, layer="countries")
    return path


def _leftover_temps(data_root: Path) -> list[Path]:
    return [p for p in (data_root / "warehouse").rglob(".*")]


def _output_bytes(data_root: Path, key: str) -> dict[str, bytes]:
    return {a: output_path(a, key, data_root).read_bytes() for a in ASSET_NAMES}


def _materializations(instance: DagsterInstance, asset: str, key: str):
    records = instance.fetch_materializations(AssetKey(asset), limit=50).records
    return [r for r in records if r.partition_key == key]


def test_a_dropped_file_runs_in_its_own_container(stack, naturalearth_shp, tmp_path):
    """A file dropped into the inbox of the stack: the daemon's sensor queues a run, the
    run launcher starts a container with the derived memory limit, the run writes the
    three outputs into the shared data root and its metadata names the container."""
    source = _countries(naturalearth_shp, tmp_path, "deployed.gpkg")
    dropped = _drop(stack, source, "deployed.gpkg")
    dissolved = output_path("dissolved_regions", "deployed.gpkg", stack.data_root)
    _wait(dissolved.exists, 240, "the dissolved output of the dropped file", every=0.2)
    latency = time.monotonic() - dropped
    instance, run, container = _sensor_run_and_container(stack, "deployed.gpkg")
    limit_mb = MAX_WORKERS * CEILING_MB + RUN_PROCESS_MB
    assert container["HostConfig"]["Memory"] == limit_mb * 2**20
    assert container["HostConfig"]["MemorySwap"] == limit_mb * 2**20  # no swap past it
    assert container["HostConfig"]["NetworkMode"] == "host"
    assert container["Config"]["Image"] == "geoiso-dagster:latest"
    assert container["State"]["ExitCode"] == 0
    host = f"geoiso-run-{run.run_id[:12]}"
    assert container["Config"]["Hostname"] == host
    for asset in ASSET_NAMES:
        (record,) = _materializations(instance, asset, "deployed.gpkg")
        metadata = record.asset_materialization.metadata
        assert metadata["worker_host"].value == host, asset
        assert metadata["worker_host"].value != os.uname().nodename
        # confined in the run container too (docs/security.md)
        assert metadata["worker_sandbox"].value.startswith("on: Landlock ABI"), asset
    dissolved_frame = geopandas.read_parquet(dissolved)
    source_frame = geopandas.read_file(source)
    assert sorted(dissolved_frame["region_id"]) == sorted(source_frame["continent"].unique())
    print(
        f"stack.sh up: {stack.up_s:.1f} s; drop -> dissolved output through a run "
        f"container: {latency:.1f} s; up -> output {stack.up_s + latency:.1f} s"
    )


def test_two_containers_on_one_partition_leave_one_good_output(stack, naturalearth_shp, tmp_path):
    """Two runs of one partition at once, in two containers writing the same data root:
    no one sweeps the other's live temp (another host's, judged by its lease), both
    succeed, the output is one whole file equal to a lone run's, no temp is left."""
    key = "deployed.gpkg"  # from the test before: its output exists
    instance = _instance(stack)
    before = pq.read_table(output_path("dissolved_regions", key, stack.data_root))
    runs = [_launch(stack, key), _launch(stack, key)]
    statuses = [_wait(lambda r=r: _finished(instance, r), 240, f"run {r}") for r in runs]
    assert statuses == [Status.SUCCESS] * 2
    hosts = set()
    for run_id in runs:
        run = instance.get_run_by_id(run_id)
        hosts.add(inspect(run.tags["docker/container_id"])["Config"]["Hostname"])
    assert len(hosts) == 2
    seen = {
        r.asset_materialization.metadata["worker_host"].value
        for r in _materializations(instance, "dissolved_regions", key)
    }
    assert hosts <= seen
    for asset in ASSET_NAMES:
        pq.read_table(output_path(asset, key, stack.data_root)).validate(full=True)
    assert pq.read_table(output_path("dissolved_regions", key, stack.data_root)).equals(before)
    assert _leftover_temps(stack.data_root) == []


def test_a_container_killed_mid_write_publishes_nothing_and_a_rerun_succeeds(
    stack, naturalearth_shp, tmp_path
):
    key = "deployed.gpkg"
    instance = _instance(stack)
    previous = _output_bytes(stack.data_root, key)
    big = _countries(naturalearth_shp, tmp_path, "big.gpkg", copies=150)
    _drop(stack, big, key)  # a changed file: the sensor runs it again
    old_runs = {r.run_id for r in _runs_of(instance, key)}
    (run,) = _wait(
        lambda: [r for r in _runs_of(instance, key) if r.run_id not in old_runs],
        60,
        "the sensor's run of the changed file",
    )
    container_id = _wait(
        lambda: instance.get_run_by_id(run.run_id).tags.get("docker/container_id"), 120, "launch"
    )
    raw_dir = stack.data_root / "warehouse" / "raw_features"
    temps = _wait(lambda: list(raw_dir.glob(f".{key}*")), 120, "the worker's temp", every=0.02)
    subprocess.run(["docker", "kill", container_id], check=True, capture_output=True)
    status = _wait(lambda: _finished(instance, run.run_id), 120, "run monitoring's verdict")
    assert status == Status.FAILURE
    assert _output_bytes(stack.data_root, key) == previous  # nothing partial published
    left = _leftover_temps(stack.data_root)
    assert left, f"the kill came after the write ({temps})"
    tag = "@geoisorun" + run.run_id.replace("-", "")[:3] + "."  # fsutil.host_tag() there
    assert all(tag in p.name for p in left), left
    # The dead container never comes back: once the lease has run out, the next writer
    # of the partition sweeps what it left (aged here instead of waiting an hour).
    old = time.time() - 3601
    for path in left:
        os.utime(path, (old, old))
    rerun = _launch(stack, key)
    assert _wait(lambda: _finished(instance, rerun), 300, "the re-run") == Status.SUCCESS
    rows = pq.ParquetFile(output_path("raw_features", key, stack.data_root)).metadata.num_rows
    assert rows == 150 * 177
    assert _leftover_temps(stack.data_root) == []


def test_a_run_over_its_container_memory_limit_fails_naming_the_limit(stack):
    """A run whose container limit (set low by its tag) is below what its workers need:
    the kernel's OOM killer takes a worker (workers volunteer), the run process survives
    and fails the step naming the limit, without a retry (same input, same result).

    The worker's need is made certain, not left to the file: it allocates until stopped
    (GEOISO_FAULTS' `memory`, set for the stack, armed for this run only: run config
    cannot give workers an environment), under a per-worker ceiling of 380 MB (the pool's
    bounds keep it within the container's 400 MB) far above what the container has left
    beside the run process and the forkserver, so the container's limit is what stops it.
    A real step on the 26,550-row file peaks close to 400 MB, and one run in a full suite
    stayed under."""
    instance = _instance(stack)
    stack.oom_armed.touch()  # the stack's GEOISO_FAULTS fault fires while this file exists
    try:
        run_id = _launch(
            stack,
            "deployed.gpkg",
            {"geoiso-dagster/container_memory_mb": "400"},
            {"resources": {"spatial_pool": {"config": {"memory_limit_mb": 380}}}},
        )
        assert _wait(lambda: _finished(instance, run_id), 300, "the run") == Status.FAILURE
    finally:
        stack.oom_armed.unlink()
    run = instance.get_run_by_id(run_id)
    container = inspect(run.tags["docker/container_id"])
    assert container["HostConfig"]["Memory"] == 400 * 2**20
    assert container["State"]["ExitCode"] != 137  # the run process ended on its own
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event]
    failures = [e for e in events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert failures, [e.event_type for e in events]
    text = failures[0].event_specific_data.error.message
    assert "killed by the kernel's OOM killer" in text and "memory limit of 400 MB" in text, text
    logged = [e.user_message or "" for e in instance.all_logs(run_id)]
    assert not [m for m in logged if "retrying in" in m], "a memory stop is not retried"


def test_postgres_restarted_while_the_daemon_runs_loses_no_run(stack, naturalearth_shp, tmp_path):
    cluster = Postgres(stack.folder / "postgres")
    source = _countries(naturalearth_shp, tmp_path, "after_restart.gpkg")
    _drop(stack, source, "after_restart.gpkg")
    cluster.stop()
    time.sleep(15)  # the daemon's sensor and queue ticks fail meanwhile
    cluster.start()
    dissolved = output_path("dissolved_regions", "after_restart.gpkg", stack.data_root)
    _wait(dissolved.exists, 240, "the output of a file dropped while Postgres was down")
    instance = _instance(stack)
    (run,) = _runs_of(instance, "after_restart.gpkg")
    assert _wait(lambda: _finished(instance, run.run_id), 120, "the run") == Status.SUCCESS
    assert psutil.pid_exists(stack.pid("daemon"))


def _location(stack: Stack) -> dict:
    (entry,) = stack.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
    return entry


def test_code_server_killed_then_back_loses_no_queued_run(stack):
    """Runs queued, the code server killed: the webserver shows the location unavailable;
    the code server started again: the location loads and every queued run succeeds."""
    instance = _instance(stack)
    runs = [_launch(stack, "deployed.gpkg") for _ in range(3)]
    command = psutil.Process(stack.pid("code-server")).cmdline()
    os.killpg(stack.pid("code-server"), signal.SIGKILL)

    def unavailable():  # the webserver watches the code server: no reload asked for
        entry = _location(stack)
        return entry["locationOrLoadError"]["__typename"] == "PythonError" and entry

    entry = _wait(unavailable, 90, "the webserver to show the location unavailable", every=1)
    assert "geoiso_dagster" in entry["name"]
    time.sleep(5)
    log = (stack.folder / "code-server.log").open("ab")
    restarted = subprocess.Popen(
        command, env=stack.env, stdout=log, stderr=log, start_new_session=True
    )
    (stack.folder / "code-server.pid").write_text(str(restarted.pid))  # stack.sh down stops it

    def loaded():  # and it reloads the location by itself when the code server is back
        return _location(stack)["locationOrLoadError"]["__typename"] == "RepositoryLocation"

    _wait(loaded, 120, "the location to load again", every=1)
    statuses = [_wait(lambda r=r: _finished(instance, r), 300, f"run {r}") for r in runs]
    assert statuses == [Status.SUCCESS] * 3


def test_a_stack_on_a_bucket_reads_and_writes_it(engine, s3_server, naturalearth_shp, tmp_path):
    """The same deployment with GEOISO_DATA_ROOT=s3://geo/deploy on the test S3 server:
    a file uploaded into the bucket's inbox is taken by the daemon's sensor, run in a
    container that reads and writes the bucket, and published there. The container gets
    the credentials as a read-only file, never as variables."""
    from tests.harness.s3 import ACCESS_KEY, SECRET_KEY, objects

    s3_server.reset()
    client = s3_server.client()
    client.create_bucket(Bucket="geo")
    folder = Path(tempfile.mkdtemp(prefix="geoiso-stack-s3-"))
    credentials = folder / "aws-credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    credentials.chmod(0o600)
    settings = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "GEOISO_SCRATCH_DIR": str(folder / "scratch"),
        "GEOISO_POOL_MAX_WORKERS": str(MAX_WORKERS),
        "GEOISO_POOL_MEMORY_LIMIT_MB": str(CEILING_MB),
    }
    stack = Stack(folder, "s3://geo/deploy", **FAST_INBOX, **settings)
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        stack.env.pop(secret, None)
    printed = stack.script("up")
    try:
        assert "data root s3://geo/deploy" in printed
        source = _countries(naturalearth_shp, tmp_path, "bucket.gpkg")
        started = time.monotonic()
        client.upload_file(str(source), "geo", "deploy/inbox/bucket.gpkg")
        dissolved = "deploy/warehouse/dissolved_regions/bucket.gpkg.parquet"
        _wait(lambda: dissolved in objects(client, "geo", "deploy/"), 240, "the dissolved object")
        latency = time.monotonic() - started
        instance, run, container = _sensor_run_and_container(stack, "bucket.gpkg")
        config = repr(container["Config"]) + repr(container["HostConfig"])
        assert SECRET_KEY not in config and ACCESS_KEY not in config
        env = dict(v.split("=", 1) for v in container["Config"]["Env"])
        assert env["GEOISO_DATA_ROOT"] == "s3://geo/deploy"
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(credentials)
        host = f"geoiso-run-{run.run_id[:12]}"
        for asset in ASSET_NAMES:
            (record,) = _materializations(instance, asset, "bucket.gpkg")
            metadata = record.asset_materialization.metadata
            assert metadata["worker_host"].value == host
            uri = f"s3://geo/deploy/warehouse/{asset}/bucket.gpkg.parquet"
            assert metadata["dagster/uri"].value == uri
        local = tmp_path / "dissolved.parquet"
        client.download_file("geo", dissolved, str(local))
        frame = geopandas.read_parquet(local)
        source_frame = geopandas.read_file(source)
        assert sorted(frame["region_id"]) == sorted(source_frame["continent"].unique())
        staged = [k for k in objects(client, "geo", "deploy/") if "/." in k]
        assert staged == []
        print(f"upload -> dissolved object through a run container on the bucket: {latency:.1f} s")
    finally:
        processes = stack.processes()
        stack.script("down")
        still = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(folder, ignore_errors=True)
    assert still == []


def test_a_worker_taken_over_in_a_run_container_reaches_nothing(engine):
    """The hostile task of tests/test_sandbox.py, in the image every run container runs
    (host network and the host user, as the launcher starts them): the kernel refuses
    every attempt there too."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            "--user",
            f"{os.getuid()}:{os.getgid()}",
            "-v",
            f"{repo / 'tests'}:/geoiso-tests/tests:ro",
            "-w",
            "/geoiso-tests",
            "-e",
            "PYTHONPATH=/geoiso-tests",
            "geoiso-dagster:latest",
            "python",
            "-m",
            "tests.harness.hostile",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sandbox"].startswith("on: Landlock ABI"), report["sandbox"]
    for what, outcome in report["attempts"].items():
        expected = "ALLOWED" if what in ("its own input", "its own output") else "refused ("
        assert outcome.startswith(expected), (what, outcome)
    assert report["changed"] == [] and report["connections"] == 0
