import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from geoiso_dagster.pool import PoolSettings, WorkerPool

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def naturalearth_shp() -> Path:
    """The Natural Earth countries shapefile shipped in the pyogrio wheel (public domain)."""
    import pyogrio

    fixtures = Path(pyogrio.__file__).parent / "tests" / "fixtures"
    path = fixtures / "naturalearth_lowres" / "naturalearth_lowres.shp"
    assert path.exists(), path
    return path


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    (root / "inbox").mkdir(parents=True)
    monkeypatch.setenv("GEOISO_DATA_ROOT", str(root))
    return root


@pytest.fixture
def copy_shapefile():
    """Copy a shapefile and its parts to `folder` (optionally leaving some suffixes out)."""

    def _copy(shp: Path, folder: Path, skip: tuple[str, ...] = (), name: str | None = None):
        stem = name or shp.stem
        for part in shp.parent.glob(shp.stem + ".*"):
            if part.suffix not in skip:
                shutil.copy(part, folder / f"{stem}{part.suffix}")
        return folder / f"{stem}.shp"

    return _copy


@pytest.fixture(scope="module")
def test_pool():
    """A real pool whose task module adds misbehaving tasks to the real ones."""
    settings = PoolSettings(
        max_workers=2,
        task_timeout_s=3,
        memory_limit_mb=500,
        task_module="tests.standins.pool_tasks",
    )
    with WorkerPool(settings) as pool:
        yield pool


@pytest.fixture(scope="module")
def unconfined_pool():
    """test_pool with the sandbox off, for the tests of what the pool does when it is off
    (a confined task writes only its private folder and starts no program)."""
    settings = PoolSettings(
        max_workers=2,
        task_timeout_s=3,
        memory_limit_mb=500,
        task_module="tests.standins.pool_tasks",
        sandbox="off",
    )
    with WorkerPool(settings) as pool:
        yield pool


def require_osgeo() -> bool:
    """CI installs the osgeo bindings and sets GEOISO_REQUIRE_OSGEO=1: there a missing
    install fails the test instead of skipping it."""
    return os.environ.get("GEOISO_REQUIRE_OSGEO") == "1"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A PostgreSQL 15 cluster of the tests' own on 127.0.0.1, stopped at the end."""
    from tests.harness.deploy import Postgres, postgres_installed, unavailable

    if not postgres_installed():
        unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    cluster = Postgres(Path(tempfile.mkdtemp(prefix="geoiso-pg-"))).up()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture
def instance_setup(request):
    """(dagster.yaml text, environment) of the instance kind the test is parametrized
    with: "sqlite" (the repo's dagster.yaml) or "postgres" (deploy/dagster.yaml's storage,
    queue, pools and run monitoring, on a fresh database, runs as child processes)."""
    if request.param == "sqlite":
        return None, {}
    from tests.harness.deploy import postgres_instance_yaml

    name = "t_" + re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[-40:]
    return postgres_instance_yaml(), request.getfixturevalue("postgres").database(name)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3 API server (moto) on 127.0.0.1 for a test module, stopped at its end:
    a server left running would be a child process the next module's orphan checks
    (tests/test_faults.py, tests/test_pool.py) rightly count."""
    from tests.harness.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server, tmp_path, monkeypatch):
    """An empty bucket `geo` and GEOISO_DATA_ROOT=s3://geo/team-a, through the standard
    AWS variables only; the host's mirror in this test's folder."""

    s3_server.reset()
    client = s3_server.client()
    client.create_bucket(Bucket="geo")
    env = s3_server.env("s3://geo/team-a", GEOISO_SCRATCH_DIR=str(tmp_path / "scratch"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield type(
        "S3Root", (), {"server": s3_server, "client": client, "env": env, "uri": "s3://geo/team-a"}
    )
