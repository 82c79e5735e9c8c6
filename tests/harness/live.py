"""A real `dagster dev` (webserver + daemon + code server) on 127.0.0.1 for the tests.

Started in its own session with default signal handling (a CI shell may hand down
ignored SIGINT/SIGTERM), stopped by signalling that session, and checked to leave no
process behind.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
# A sensor that reacts within seconds, for tests and benchmarks (defaults: 5 s, 15 s).
FAST_INBOX = {"GEOISO_INBOX_SETTLE_S": "1", "GEOISO_INBOX_INTERVAL_S": "5"}
REPO = Path(__file__).resolve().parents[2]


_READY = """{
  workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename } } } }
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


class DagsterDev:
    def __init__(
        self, home: Path, data_root: Path, log: Path, instance_yaml: str | None = None, **env: str
    ) -> None:
        """`instance_yaml`: the instance's dagster.yaml (default: the repo's, SQLite)."""
        self.home, self.data_root, self.log_path = home, data_root, log
        self.instance_yaml = (
            instance_yaml or (REPO / "deploy" / "local" / "dagster.yaml").read_text()
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "GEOISO_DATA_ROOT": str(data_root),
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "DagsterDev":
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(self.instance_yaml)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [BIN / "dagster", "dev", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_default_signals,
        )
        self.wait_ready(timeout)
        return self

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        assert "errors" not in payload, payload["errors"]
        return payload["data"]

    def wait_ready(self, timeout: float) -> None:
        """Server info answers, the code location is loaded, every daemon is healthy."""
        deadline = time.monotonic() + timeout
        last = "nothing yet"
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited; see {self.log_path}"
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5):
                    pass
                data = self.graphql(_READY)
                entries = data["workspaceOrError"]["locationEntries"]
                daemons = data["instance"]["daemonHealth"]["allDaemonStatuses"]
                loaded = [
                    e
                    for e in entries
                    if e["loadStatus"] == "LOADED"
                    and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
                ]
                unhealthy = [d["daemonType"] for d in daemons if d["required"] and not d["healthy"]]
                if loaded and not unhealthy:
                    return
                last = f"locations={entries} unhealthy daemons={unhealthy}"
            except (OSError, AssertionError) as exc:
                last = repr(exc)
            time.sleep(1)
        raise TimeoutError(f"dagster dev not ready after {timeout} s: {last}; log {self.log_path}")

    def processes(self) -> list[psutil.Process]:
        """Every process of the server's session (webserver, daemon, code servers, runs,
        their worker pools)."""
        if self.proc is None:
            return []
        sid = self.proc.pid  # start_new_session: the server leads its own session
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, psutil.Error, PermissionError):
                continue
        return found

    def stop(self, timeout: float = 60) -> list[psutil.Process]:
        """SIGTERM the session, SIGKILL what remains; return what was still alive after
        the polite stop (the tests assert it is nothing)."""
        if self.proc is None:
            return []
        session = self.processes()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _, alive = psutil.wait_procs(session, timeout=15)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)
        self._log.close()
        self.proc = None
        return alive


def materialize_command(key: str, config: dict | None = None, select=None) -> list:
    """The real `dagster asset materialize` of partition `key`: the assets `select` names,
    all three unless it does."""
    from geoiso_dagster.defs.assets import ASSET_NAMES

    command = [
        BIN / "dagster",
        "asset",
        "materialize",
        "-m",
        "geoiso_dagster.definitions",
        "--select",
        ",".join(select or ASSET_NAMES),
        "--partition",
        key,
    ]
    if config is not None:
        command += ["--config-json", json.dumps(config)]
    return command


def launch_params(partition: str, run_config: dict | None = None, tags: dict | None = None):
    """ExecutionParams of the webserver's launch mutation (what the UI sends) for the three
    assets of one partition."""
    from geoiso_dagster.defs.assets import ASSET_NAMES

    return {
        "selector": {
            "repositoryLocationName": "geoiso_dagster",
            "repositoryName": "__repository__",
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [{"path": [a]} for a in ASSET_NAMES],
        },
        "runConfigData": json.dumps(run_config or {}),
        "mode": "default",
        "executionMetadata": {
            "tags": [
                {"key": k, "value": v}
                for k, v in {"dagster/partition": partition, **(tags or {})}.items()
            ]
        },
    }


def report_check_events(instance, asset: str, prefix: str, n: int) -> None:
    """Write `n` asset events to `instance` as a step writes them (a passed check result
    for partitions <prefix>0 .. <prefix>n-1), without the step around them: the probe of
    what one event costs an instance."""
    from dagster import AssetCheckEvaluation, AssetKey

    for i in range(n):
        instance.report_runless_asset_event(
            AssetCheckEvaluation(
                asset_key=AssetKey(asset), check_name="probe", passed=True, partition=f"{prefix}{i}"
            )
        )


def covered_partitions(instance, run) -> list[str]:
    """The partition keys a run covers: its one partition, or every key of its range
    (a batch run), in the order the instance keeps them."""
    if "dagster/partition" in run.tags:
        return [run.tags["dagster/partition"]]
    start = run.tags["dagster/asset_partition_range_start"]
    end = run.tags["dagster/asset_partition_range_end"]
    keys = instance.get_dynamic_partitions("source_files")
    return keys[keys.index(start) : keys.index(end) + 1]
