"""Worker tasks that move files between an S3 data root and this host's mirror of it.

They run in the pool like every task (timeout kill, memory ceiling, errors by kind), so
a stalled download or upload is killed and retried like a stalled GDAL read. Sources are
read in place (spatial/remote.py), except a zip or a name GDAL cannot be given safely:
fetched whole into the mirror first, where the source jail (spatial/sources.py) checks it
exactly as a file of a local root.
"""

import os
from pathlib import Path

from geoiso_dagster import formats, objectstore, paths
from geoiso_dagster.errors import BadInputError
from geoiso_dagster.spatial import faults, remote


def _local(relative: str) -> Path:
    """The mirror path of `relative`, checked to stay inside the mirror."""
    mirror = paths.data_root()
    target = (mirror / relative).resolve()
    if not target.is_relative_to(mirror):
        raise BadInputError(relative, f"resolves outside the mirror {mirror}")
    return target


def _fetch_one(root: objectstore.S3Root, info: objectstore.ObjectInfo, local: Path) -> bool:
    with objectstore.mirror_lock(local):
        if objectstore.mirror_holds(local, info):
            return False
        objectstore.etag_file(local).unlink(missing_ok=True)
        fetched = objectstore.download(root, info.key, local, expect_etag=info.etag)
        objectstore.remember(local, fetched.etag)
    return True


def fetch(relative: str, source: bool = False) -> dict:
    """Bring `<root>/<relative>` into the mirror unless it holds that version already.
    With `source`, also the files its format may open beside it (a shapefile's parts, by
    exact stem) and nothing else; parts the bucket no longer has are removed from the
    mirror, and a GeoPackage whose SQLite log holds changes is refused as locally."""
    faults.at_start("fetch")
    root = remote.s3_root()
    root.key(relative)  # UnsafeNameError for a path out of the root, as for a local one
    local = _local(relative)
    local.parent.mkdir(parents=True, exist_ok=True)
    main = objectstore.head(root, root.key(relative))
    fetched = []
    fetched_bytes = 0
    if source:
        present = objectstore.source_objects(root, relative)
        remote.check_no_pending_wal(f"s3://{root.bucket}/{main.key}", present)
        wanted = set(formats.companion_names(local.name))
        for name in sorted(wanted):
            part = local.with_name(name)
            if name.endswith(formats.SQLITE_PARTS):
                continue  # never used: a GeoPackage with a live log was refused above
            if name in present:
                if _fetch_one(root, present[name], part):
                    fetched.append(name)
                    fetched_bytes += present[name].size
            elif os.path.lexists(part):
                with objectstore.mirror_lock(part):
                    part.unlink(missing_ok=True)
                    objectstore.etag_file(part).unlink(missing_ok=True)
    if _fetch_one(root, main, local):
        fetched.append(local.name)
        fetched_bytes += main.size
    return {
        "path": str(local),
        "fetched": fetched,
        "fetched_bytes": fetched_bytes,
        "bytes": main.size,
        "etag": main.etag,
    }


def upload(path: str, relative: str) -> dict:
    """Upload the local staged file `path` to the staged key of `relative`."""
    faults.at_start("upload")
    root = remote.s3_root()
    local = Path(path)
    if not local.resolve().is_relative_to(paths.data_root()):
        raise BadInputError(path, "is not inside this host's mirror of the data root")
    info = objectstore.upload(
        root, local, root.key(relative), on_part=lambda n: faults.at_point("upload", "part")
    )
    return {"key": info.key, "bytes": info.size, "etag": info.etag}


def download_staged(relative: str, local: Path) -> objectstore.ObjectInfo:
    """Read a staged object back into `local`, for the checks (tasks.inspect_object)."""
    root = remote.s3_root()
    return objectstore.download(root, root.key(relative), local)
