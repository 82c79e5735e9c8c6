"""GeoisoDockerRunLauncher's container settings, without Docker: what every run container
gets (limit, host name, mounts, environment), from the run's config, its tag and the
deployment's variables. The live containers are in test_deploy.py."""

from pathlib import Path

import pytest
from dagster import DagsterRun
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

from geoiso_dagster import launcher, paths
from geoiso_dagster.launcher import GeoisoDockerRunLauncher, container_memory_mb


def _run(run_config=None, tags=None) -> DagsterRun:
    return DagsterRun(
        job_name="geo_pipeline",
        run_id="0123456789abcdef-run",
        run_config=run_config or {},
        tags=tags or {},
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (
        "GEOISO_POOL_MAX_WORKERS",
        "GEOISO_POOL_MEMORY_LIMIT_MB",
        "GEOISO_IMAGE",
        "GEOISO_RUN_CONTAINER_MEMORY_MB",
    ):
        monkeypatch.delenv(name, raising=False)


def test_the_limit_is_the_workers_ceilings_plus_the_run_process(monkeypatch):
    assert container_memory_mb(_run()) == 2 * 4096 + 768  # the resource's defaults
    monkeypatch.setenv("GEOISO_POOL_MAX_WORKERS", "3")
    monkeypatch.setenv("GEOISO_POOL_MEMORY_LIMIT_MB", "1000")
    assert container_memory_mb(_run()) == 3 * 1000 + 768
    config = {"resources": {"spatial_pool": {"config": {"max_workers": 1}}}}
    assert container_memory_mb(_run(config), run_process_mb=500) == 1000 + 500
    tagged = _run(config, {"geoiso-dagster/container_memory_mb": "640"})
    assert container_memory_mb(tagged) == 640
    monkeypatch.setenv("GEOISO_RUN_CONTAINER_MEMORY_MB", "900")
    assert container_memory_mb(_run(config)) == 900


@pytest.mark.parametrize("value", ["lots", "-1", "1e9", "0", "99999999999", "512; rm -rf /"])
def test_a_memory_tag_that_is_not_a_size_is_refused_clearly(value):
    with pytest.raises(ValueError, match="must be a whole number of MB from 128"):
        container_memory_mb(_run(tags={"geoiso-dagster/container_memory_mb": value}))


def test_every_run_container_gets_its_limit_host_mounts_and_only_our_variables(
    monkeypatch, tmp_path
):
    root, home = tmp_path / "data", tmp_path / "home"
    monkeypatch.setenv("GEOISO_DATA_ROOT", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GEOISO_POOL_MAX_WORKERS", "2")
    monkeypatch.setenv("GEOISO_POOL_MEMORY_LIMIT_MB", "1024")
    monkeypatch.setenv("DAGSTER_POSTGRES_HOST", "127.0.0.1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-containers")
    monkeypatch.setenv("GEOISO_IMAGE", "registry.example/geoiso:1.2")
    run_launcher = GeoisoDockerRunLauncher(network="host")
    assert run_launcher.image == "registry.example/geoiso:1.2"
    assert GeoisoDockerRunLauncher(image="mine:1", network="host").image == "mine:1"
    context = run_launcher.get_container_context(_run())
    kwargs = context.container_kwargs
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == f"{2 * 1024 + 768}m"
    assert kwargs["hostname"] == "geoiso-run-0123456789ab"
    assert kwargs["volumes"] == {
        str(root): {"bind": str(root), "mode": "rw"},
        str(home): {"bind": str(home), "mode": "rw"},
    }
    assert kwargs["labels"]["geoiso-dagster"] == "run"
    env = dict(v.split("=", 1) for v in context.env_vars)
    assert env["GEOISO_DATA_ROOT"] == str(root) and env["DAGSTER_HOME"] == str(home)
    assert env["GEOISO_POOL_MEMORY_LIMIT_MB"] == "1024"
    assert env["DAGSTER_POSTGRES_HOST"] == "127.0.0.1"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "PATH" not in env
    assert context.networks == ["host"]


def test_a_bucket_root_passes_its_uri_the_mirror_and_credentials_as_a_file_only(
    monkeypatch, tmp_path
):
    credentials = tmp_path / "aws" / "credentials"
    credentials.parent.mkdir()
    credentials.write_text("[default]\naws_access_key_id = AKIA1\naws_secret_access_key = s3cret\n")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("GEOISO_DATA_ROOT", "s3://geo/team-a")
    monkeypatch.setenv("GEOISO_SCRATCH_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-not-for-containers")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-containers")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "not-for-containers-either")
    context = GeoisoDockerRunLauncher(network="host").get_container_context(_run())
    env = dict(v.split("=", 1) for v in context.env_vars)
    mirror = str(paths.data_root())
    assert mirror.startswith(str(tmp_path / "scratch")) and Path(mirror).is_dir()
    assert context.container_kwargs["volumes"] == {
        mirror: {"bind": mirror, "mode": "rw"},
        str(credentials): {"bind": str(credentials), "mode": "ro"},
    }
    assert env["GEOISO_DATA_ROOT"] == "s3://geo/team-a"
    assert env["GEOISO_SCRATCH_DIR"] == str(tmp_path / "scratch")
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(credentials)
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert secret not in env
    assert "not-for-containers" not in repr(context.container_kwargs) + repr(env)


def test_the_instance_config_overrides_our_container_settings(monkeypatch):
    run_launcher = GeoisoDockerRunLauncher(
        network="host", container_kwargs={"mem_limit": "8g", "hostname": "fixed"}
    )
    kwargs = run_launcher.get_container_context(_run()).container_kwargs
    assert kwargs["mem_limit"] == "8g" and kwargs["hostname"] == "fixed"


class _Container:
    labels = {"geoiso-dagster/memory_mb": "1234"}
    attrs = {"State": {"OOMKilled": True, "ExitCode": 137}}


def test_run_monitoring_names_the_limit_when_the_kernel_killed_the_run(monkeypatch):
    run_launcher = GeoisoDockerRunLauncher(network="host")
    failed = CheckRunHealthResult(WorkerStatus.FAILED, msg="Container status is exited.")
    monkeypatch.setattr(
        launcher.DockerRunLauncher, "check_run_worker_health", lambda self, run: failed
    )
    monkeypatch.setattr(GeoisoDockerRunLauncher, "_get_container", lambda self, run: _Container())
    verdict = run_launcher.check_run_worker_health(_run())
    assert verdict.status == WorkerStatus.FAILED
    assert "over its memory limit of 1234 MB" in verdict.msg
    assert "Container status is exited." in verdict.msg
