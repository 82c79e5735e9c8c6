"""The deployment's real parts for the tests: a PostgreSQL cluster of their own, a Docker
engine (started when none runs, stopped after), the image, and the whole stack
(scripts/stack.sh) on free ports, each stopped by whoever started it.

CI sets GEOISO_REQUIRE_DEPLOY=1: there a missing PostgreSQL or Docker fails the tests
instead of skipping them (scripts/setup.sh --test installs both when it runs as root).
"""

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.harness.live import REPO, free_port

SCRIPTS = REPO / "scripts"
REQUIRED = os.environ.get("GEOISO_REQUIRE_DEPLOY") == "1"
IMAGE = os.environ.get("GEOISO_IMAGE", "geoiso-dagster:latest")


def unavailable(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (GEOISO_REQUIRE_DEPLOY=1)")
    pytest.skip(what)


def postgres_instance_yaml() -> str:
    """deploy/dagster.yaml with the default run launcher (runs as child processes): the
    Postgres storage, queue, pools and run monitoring of the deployment, no containers."""
    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    config.pop("run_launcher")
    return yaml.safe_dump(config)


class Postgres:
    """A cluster in `folder` on 127.0.0.1:<free port> (scripts/postgres.sh)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.env = {
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": str(self.port),
            "DAGSTER_POSTGRES_USER": "geoiso",
            "DAGSTER_POSTGRES_PASSWORD": secrets.token_urlsafe(18),
            "DAGSTER_POSTGRES_DB": "dagster",
        }

    def _script(self, *args: str) -> None:
        subprocess.run(
            [SCRIPTS / "postgres.sh", *args],
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
        )

    def up(self) -> "Postgres":
        self._script("up", str(self.folder), str(self.port))
        return self

    def stop(self) -> None:
        self._script("stop", str(self.folder))

    def start(self) -> None:
        self._script("start", str(self.folder))

    def database(self, name: str) -> dict[str, str]:
        """A new, empty database; the environment that points an instance at it."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.env["DAGSTER_POSTGRES_USER"],
            password=self.env["DAGSTER_POSTGRES_PASSWORD"],
            dbname="postgres",
        )
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return {**self.env, "DAGSTER_POSTGRES_DB": name}


def postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


def docker_answers() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )


class DockerEngine:
    """dockerd as scripts/dockerd.sh starts it (host networking only), unless one runs."""

    def __init__(self, folder: Path) -> None:
        self.pidfile, self.log = folder / "dockerd.pid", folder / "dockerd.log"

    def start(self) -> "DockerEngine":
        if not docker_answers() and (os.getuid() != 0 or not shutil.which("dockerd")):
            unavailable("no Docker engine answers and none can be started here (root + docker.io)")
        subprocess.run([SCRIPTS / "dockerd.sh", "start", self.pidfile, self.log], check=True)
        return self

    def stop(self) -> None:
        subprocess.run([SCRIPTS / "dockerd.sh", "stop", self.pidfile], check=True)

    @staticmethod
    def build_image() -> float:
        """`make image` (the code as it is now); returns the seconds it took."""
        started = time.monotonic()
        subprocess.run([SCRIPTS / "image.sh"], check=True, capture_output=True, cwd=REPO)
        return time.monotonic() - started


def containers(*filters: str, all_states: bool = False) -> list[dict]:
    command = ["docker", "ps", "--no-trunc", "--format", "{{json .}}"]
    command += ["-a"] if all_states else []
    for f in filters:
        command += ["--filter", f]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def inspect(container_id: str) -> dict:
    out = subprocess.run(
        ["docker", "inspect", container_id], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)[0]


class Stack:
    """scripts/stack.sh up|down in `folder`, on free ports, with its own data root."""

    def __init__(self, folder: Path, data_root: Path, **env: str) -> None:
        self.folder, self.data_root = folder, data_root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "GEOISO_STACK_DIR": str(folder),
            "GEOISO_DATA_ROOT": str(data_root),
            "GEOISO_WEBSERVER_PORT": str(self.port),
            "GEOISO_CODE_SERVER_PORT": str(free_port()),
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": str(free_port()),
            "DAGSTER_POSTGRES_USER": "geoiso",
            "DAGSTER_POSTGRES_PASSWORD": secrets.token_urlsafe(18),
            "DAGSTER_POSTGRES_DB": "dagster",
            **env,
        }
        self.env.pop("DAGSTER_HOME", None)

    def script(self, command: str, timeout: float = 600) -> str:
        done = subprocess.run(
            [SCRIPTS / "stack.sh", command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    @property
    def instance_env(self) -> dict[str, str]:
        """What a process needs to open the stack's instance (DAGSTER_HOME + Postgres)."""
        return {
            "DAGSTER_HOME": str(self.folder / "home"),
            **{k: v for k, v in self.env.items() if k.startswith("DAGSTER_POSTGRES_")},
        }

    def pid(self, name: str) -> int:
        return int((self.folder / f"{name}.pid").read_text())

    def processes(self) -> list[psutil.Process]:
        """Every process of the stack's sessions, and its Postgres cluster."""
        sessions = set()
        for name in ("code-server", "webserver", "daemon", "dockerd"):
            try:
                sessions.add(self.pid(name))
            except (OSError, ValueError):
                continue
        found = []
        cluster = str(self.folder / "postgres")
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getsid(p.pid) in sessions or cluster in " ".join(p.info["cmdline"] or []):
                    if p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
            except (ProcessLookupError, psutil.Error, PermissionError):
                continue
        return found

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{error}: {error.read()[:3000]!r}") from None
        assert "errors" not in payload, payload["errors"]
        return payload["data"]
