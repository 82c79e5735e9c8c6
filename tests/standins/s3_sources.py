"""Real tasks, plus what the in-place reading tests need inside a real worker: a task
that tries to make GDAL open other network names while a source is read, and a read-back
that replaces the source object once (as a user re-uploading it mid-step would)."""

import os
from pathlib import Path

import pyogrio

from geoiso_dagster import dataroot, gdal_jail, objectstore
from geoiso_dagster.spatial import remote
from geoiso_dagster.spatial import tasks as _real
from geoiso_dagster.spatial.tasks import *  # noqa: F403


def _opens(name: str) -> str:
    try:
        return f"opened: {pyogrio.read_info(name)['features']} features"
    except Exception as exc:
        return f"refused: {exc}"


def open_while_reading(source: str, others: list[str]) -> dict:
    """What GDAL opens while `source` is being read, what it opens once it is not, and
    what GDAL configuration and environment the worker is left with."""
    with remote.gdal_access(source):
        during = {name: _opens(name) for name in [remote.gdal_name(source), *others]}
    after = _opens(remote.gdal_name(source))
    options = {key for values in gdal_jail.config_options().values() for key in values}
    return {
        "during": during,
        "after": after,
        "aws_options_left": sorted(k for k in options if k.startswith("AWS_")),
        "gdal_aws_environment": sorted(k for k in os.environ if k.startswith("AWS_S3")),
    }


def inspect_object(relative: str, **kwargs) -> dict:
    """The real read-back, after replacing the source object once with the file named by
    GEOISO_TEST_REPLACEMENT (state: a marker file beside it)."""
    replacement = Path(os.environ["GEOISO_TEST_REPLACEMENT"])
    marker = replacement.with_name(replacement.name + ".done")
    source = kwargs.get("source")
    if source and not marker.exists():
        marker.touch()
        root = dataroot.bucket()
        key = objectstore.split_uri(source)[1]
        objectstore.client().upload_file(str(replacement), root.bucket, key)
    return _real.inspect_object(relative, **kwargs)
