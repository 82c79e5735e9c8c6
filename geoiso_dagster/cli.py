"""`geoiso`: register source files and look at outputs from a shell. No geo imports.

geoiso add FILE...   copy each file (and its sidecars) into the inbox, register its
                     partition in the Dagster instance ($DAGSTER_HOME), print its key
geoiso show KEY...   rows, CRS and path of each asset's output for those partitions
geoiso doctor        what a worker sees: environment, GDAL config, library versions

`add` and `show` take -m MODULE, the code location as `dagster dev -m` names it (default
geoiso_dagster.definitions): its geo assets say what a sidecar may set and which outputs
there are.
"""

import argparse
import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq

from geoiso_dagster import dataroot, formats, inbox, paths
from geoiso_dagster.errors import BadInputError, GeoisoError

DEFAULT_MODULE = "geoiso_dagster.definitions"


def location_assets(module: str = DEFAULT_MODULE) -> list:
    """The geo assets of the code location `module` defines (its Definitions object), in
    dependency order (steps.spec_of finds each one's spec)."""
    import importlib

    from dagster import Definitions

    from geoiso_dagster.defs.sensors import in_dependency_order
    from geoiso_dagster.defs.steps import GROUP, spec_of

    found = [
        v for v in vars(importlib.import_module(module)).values() if isinstance(v, Definitions)
    ]
    if len(found) != 1:
        raise GeoisoError(f"{module}: defines {len(found)} Definitions objects, not one")
    assets = list(found[0].assets or ())
    names = []
    for name in in_dependency_order(assets, GROUP):
        try:
            names.append(spec_of(name).name)
        except KeyError:  # an asset of the group that geo_asset did not build
            continue
    return names


def add(files: list[str], module: str = DEFAULT_MODULE) -> list[str]:
    dataroot.check_setting()  # a root this project cannot serve is refused first
    if not os.environ.get("DAGSTER_HOME"):
        raise GeoisoError(
            "DAGSTER_HOME is not set: set it to the instance folder the dagster CLI and "
            "`dagster dev` use, so the partition is registered where they look"
        )
    from dagster import DagsterInstance

    from geoiso_dagster.defs.partitions import source_files
    from geoiso_dagster.defs.steps import sidecar_rules

    rules = sidecar_rules(location_assets(module))  # what the location's steps let it set

    root = dataroot.root()
    root.check()  # a bucket that does not answer is refused here, naming it, not in a run
    keys = []
    for name in files:
        source = Path(name)
        if not source.is_file():
            raise GeoisoError(f"{source}: no such file")
        inbox.check_source_name(source)
        key = source.name
        if why := inbox.pending_wal(source):
            raise BadInputError(str(source), why.replace("waits for", "needs"))
        inbox.read_sidecar(source, rules)  # a bad sidecar refuses its file here, not in a run
        paths.source_path(key, root.local)  # a safe name inside the inbox
        # SQLite's -wal/-shm stay behind: a GeoPackage with changes in its log was
        # refused above.
        parts = [p for p in inbox.companions(source) if not p.name.endswith(formats.SQLITE_PARTS)]
        inbox.check_delivered_parts(source, parts)
        root.add(source, parts, key)
        keys.append(key)
    # One `geoiso add` at a time opens the instance: on a fresh one, each would create its
    # SQLite tables and migration head at once ("table ... already exists", "more than one
    # head"); the lock file lives in DAGSTER_HOME, beside the instance it guards.
    with _instance_lock(Path(os.environ["DAGSTER_HOME"])), DagsterInstance.get() as instance:
        new = [k for k in keys if not instance.has_dynamic_partition(source_files.name, k)]
        if new:
            instance.add_dynamic_partitions(source_files.name, new)
    return keys


@contextlib.contextmanager
def _instance_lock(home: Path):
    try:
        handle = open(home / ".geoiso-add.lock", "a")
    except OSError as exc:
        raise GeoisoError(f"{home}: cannot open the instance's lock file: {exc.strerror}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _crs_label(geo: dict) -> str:
    crs = geo["columns"][geo["primary_column"]].get("crs", "OGC:CRS84")
    if isinstance(crs, dict):
        ident = crs.get("id") or {}
        return f"{ident['authority']}:{ident['code']}" if ident else crs.get("name", "?")
    return str(crs)


def show(keys: list[str], module: str = DEFAULT_MODULE) -> list[dict]:
    from geoiso_dagster.defs.steps import output_of

    rows = []
    root = dataroot.root()
    assets = location_assets(module)
    for key in keys:
        for asset in assets:
            path = output_of(asset, key)
            shown = root.shown(path)
            if not path.exists():
                rows.append(
                    {
                        "partition": key,
                        "asset": asset,
                        "rows": None,
                        "crs": None,
                        "path": f"{shown} (missing)",
                    }
                )
                continue
            if path.suffix != ".parquet":  # another output kind: where it is
                rows.append(
                    {"partition": key, "asset": asset, "rows": None, "crs": None, "path": shown}
                )
                continue
            parquet = pq.ParquetFile(path)
            geo = json.loads(parquet.schema_arrow.metadata[b"geo"])
            rows.append(
                {
                    "partition": key,
                    "asset": asset,
                    "rows": parquet.metadata.num_rows,
                    "crs": _crs_label(geo),
                    "path": shown,
                }
            )
    return rows


def doctor() -> dict:
    from geoiso_dagster.defs.resources import SpatialWorkerPool
    from geoiso_dagster.pool import WorkerPool

    with WorkerPool(SpatialWorkerPool.from_env().settings()) as pool:
        return pool.run("environment").facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geoiso", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", help="copy files into the inbox and register partitions")
    p_add.add_argument("files", nargs="+")
    p_show = sub.add_parser("show", help="rows, CRS and path of each output")
    p_show.add_argument("keys", nargs="+")
    for each in (p_add, p_show):
        each.add_argument(
            "-m", "--module", default=DEFAULT_MODULE, help="the code location's module"
        )
    sub.add_parser("doctor", help="what a worker process sees")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            for key in add(args.files, args.module):
                sys.stdout.write(f"{key}\n")
        elif args.command == "show":
            for row in show(args.keys, args.module):
                rows = "-" if row["rows"] is None else row["rows"]
                sys.stdout.write(
                    f"{row['partition']}  {row['asset']:<21} rows={rows:<6} "
                    f"crs={row['crs'] or '-':<10} {row['path']}\n"
                )
        else:
            sys.stdout.write(json.dumps(doctor(), indent=2) + "\n")
    except GeoisoError as exc:
        sys.stderr.write(f"geoiso: {exc}\n")
        return 2
    except OSError as exc:  # storage nothing above classified: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"geoiso: {where}{exc.strerror or exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
