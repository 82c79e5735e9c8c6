"""GeoisoDockerRunLauncher: every run in its own container, sized from the pool settings.

Dagster's DockerRunLauncher (dagster-docker) with what this code location needs on top,
so that deploy/dagster.yaml stays declarative:

- a cgroup memory limit per run container: max_workers x memory_limit_mb (the pool's
  per-worker ceilings, from the run's config or the GEOISO_POOL_* variables) plus the
  run process; swap is off, so the limit is the limit;
- the image from GEOISO_IMAGE (default geoiso-dagster:latest) unless the config names one;
- a host name of its own per run container (the metadata's worker_host, and the host
  identity in temp names: with host networking a container would otherwise report the
  host's name);
- the data root and DAGSTER_HOME bound at the same paths, the GEOISO_* and
  DAGSTER_POSTGRES_* variables passed on, and the host user's uid:gid, so outputs belong
  to the user who runs the deployment;
- with an s3:// data root, the host's mirror bound instead, the AWS settings that are
  not secrets passed on (endpoint, region, profile), and the AWS config and credentials
  files bound read-only: keys travel as files (or come from an instance role), never as
  container variables, which `docker inspect` shows to anyone who may list containers;
- a run monitor's verdict that names the memory limit when the kernel killed the run
  process at it.

No geo imports: the daemon and the webserver load this class.
"""

import os
from pathlib import Path

from dagster import Field, IntSource, StringSource
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster_docker import DockerRunLauncher
from dagster_docker.container_context import DockerContainerContext
from dagster_docker.utils import DOCKER_CONFIG_SCHEMA

from geoiso_dagster.dataroot import DATA_ROOT_ENV
from geoiso_dagster.defs.resources import SpatialWorkerPool
from geoiso_dagster.paths import data_root, root_uri

IMAGE_ENV = "GEOISO_IMAGE"
DEFAULT_IMAGE = "geoiso-dagster:latest"
# Override the derived limit (MB): of one run, by its tag; of every run, by the variable.
CONTAINER_MEMORY_TAG = "geoiso-dagster/container_memory_mb"
CONTAINER_MEMORY_ENV = "GEOISO_RUN_CONTAINER_MEMORY_MB"
MIN_CONTAINER_MB, MAX_CONTAINER_MB = 128, 4 * 2**20
# What the run process itself needs beside its workers: Dagster, the definitions, the
# instance's connections (about 250 MB measured here), with room to spare.
DEFAULT_RUN_PROCESS_MB = 768
LABEL = "geoiso-dagster"
MEMORY_LABEL = "geoiso-dagster/memory_mb"
_PASSED_ON = ("GEOISO_", "DAGSTER_POSTGRES_")
# AWS settings a run container gets as variables: none of them is a secret.
_AWS_PASSED_ON = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CA_BUNDLE",
    "AWS_STS_REGIONAL_ENDPOINTS",
)
_AWS_FILES = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def _pool_setting(run_config: dict, field: str) -> int:
    """A pool setting as the run will see it: its run config, else the GEOISO_POOL_*
    variable, else the resource's default."""
    configured = ((run_config or {}).get("resources") or {}).get("spatial_pool", {}).get(
        "config"
    ) or {}
    if field in configured:
        return int(configured[field])
    value = os.environ.get(f"GEOISO_POOL_{field.upper()}")
    if value:
        return int(value)
    return int(SpatialWorkerPool.model_fields[field].default)


def _megabytes(value: str, where: str) -> int:
    """A memory size someone set (a tag anyone launching a run may set): whole MB, within
    reason, or a clear refusal."""
    text = str(value).strip()
    if not text.isdigit() or not MIN_CONTAINER_MB <= int(text) <= MAX_CONTAINER_MB:
        raise ValueError(
            f"{where} must be a whole number of MB from {MIN_CONTAINER_MB} to "
            f"{MAX_CONTAINER_MB}, not {text[:40]!r}"
        )
    return int(text)


def container_memory_mb(run: DagsterRun, run_process_mb: int = DEFAULT_RUN_PROCESS_MB) -> int:
    """The memory limit of a run's container: its workers' ceilings plus the run process,
    unless the run's tag or the operator's variable sets it."""
    if run.tags.get(CONTAINER_MEMORY_TAG):
        return _megabytes(run.tags[CONTAINER_MEMORY_TAG], f"the run tag {CONTAINER_MEMORY_TAG}")
    if os.environ.get(CONTAINER_MEMORY_ENV):
        return _megabytes(os.environ[CONTAINER_MEMORY_ENV], CONTAINER_MEMORY_ENV)
    workers = _pool_setting(run.run_config, "max_workers")
    return workers * _pool_setting(run.run_config, "memory_limit_mb") + run_process_mb


def run_host_name(run_id: str) -> str:
    return f"geoiso-run-{run_id[:12]}"


class GeoisoDockerRunLauncher(DockerRunLauncher):
    def __init__(self, inst_data=None, run_process_memory_mb=DEFAULT_RUN_PROCESS_MB, **config):
        config["image"] = config.get("image") or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
        super().__init__(inst_data=inst_data, **config)
        self.run_process_memory_mb = run_process_memory_mb

    @classmethod
    def config_type(cls):
        return {
            **DOCKER_CONFIG_SCHEMA,
            "image": Field(StringSource, is_required=False),
            "run_process_memory_mb": Field(
                IntSource,
                is_required=False,
                default_value=DEFAULT_RUN_PROCESS_MB,
                description="Memory of the run process, added to max_workers x memory_limit_mb.",
            ),
        }

    def get_container_context(self, dagster_run: DagsterRun) -> DockerContainerContext:
        """This deployment's container settings, then whatever the instance config or the
        code location sets (those win)."""
        memory_mb = container_memory_mb(dagster_run, self.run_process_memory_mb)
        # The local root, or with an S3 root this host's mirror of it (a cache the run
        # container shares; the bucket stays the truth).
        root = str(data_root())
        Path(root).mkdir(parents=True, exist_ok=True)  # else dockerd makes it, as root
        mounts = {root: {"bind": root, "mode": "rw"}}
        environment = [
            f"{name}={value}"
            for name, value in sorted(os.environ.items())
            if (name.startswith(_PASSED_ON) and name != DATA_ROOT_ENV) or name in _AWS_PASSED_ON
        ]
        environment.append(f"{DATA_ROOT_ENV}={root_uri()}")
        for name in _AWS_FILES:
            path = os.environ.get(name)
            if path and Path(path).is_file():
                resolved = str(Path(path).resolve())
                mounts[resolved] = {"bind": resolved, "mode": "ro"}
                environment.append(f"{name}={resolved}")
        if os.environ.get("DAGSTER_HOME"):
            home = str(Path(os.environ["DAGSTER_HOME"]).resolve())
            mounts[home] = {"bind": home, "mode": "rw"}
            environment.append(f"DAGSTER_HOME={home}")
        ours = DockerContainerContext(
            env_vars=environment,
            container_kwargs={
                "mem_limit": f"{memory_mb}m",
                "memswap_limit": f"{memory_mb}m",
                "hostname": run_host_name(dagster_run.run_id),
                "volumes": mounts,
                "user": f"{os.getuid()}:{os.getgid()}",
                "labels": {LABEL: "run", MEMORY_LABEL: str(memory_mb)},
            },
        )
        return ours.merge(super().get_container_context(dagster_run))

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        result = super().check_run_worker_health(run)
        if result.status != WorkerStatus.FAILED:
            return result
        container = self._get_container(run)
        state = (container.attrs.get("State") or {}) if container is not None else {}
        if state.get("OOMKilled"):
            limit = (container.labels or {}).get(MEMORY_LABEL, "?")
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                msg=f"The run container went over its memory limit of {limit} MB "
                "(max_workers x memory_limit_mb + the run process) and the kernel killed it. "
                "Lower max_workers or memory_limit_mb, or raise the limit (the run's tag "
                f"{CONTAINER_MEMORY_TAG}, or {CONTAINER_MEMORY_ENV}). {result.msg}",
            )
        return result
