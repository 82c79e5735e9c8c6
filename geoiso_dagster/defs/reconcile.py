"""The catalog and the files agree, after any kill.

A step publishes a file (an atomic rename, or an object copied into place) and then the
catalog records it: the two are not one transaction, and a run killed between them left
the catalog describing the previous file, or (a batch) published files with no record.
So every materialization carries its file's stamp (`PUBLISHED_AS`: the inode, size and
mtime of a local file, the ETag of an object, as the data root tells them), and before a
step works on its files, it compares each file it reads or writes (its upstream outputs,
its own previous output) with the latest record of it: a file there (published at least
RECORD_GRACE_S ago, so that no live run is about to record it) whose stamp no record
has is recorded now, as found on disk (rows and size from its own footer), marked
`geoiso/repaired` with why, and the run log says so. Records made before stamps existed
are taken as they are. Before publishing, the step also writes to the catalog (a log
line): an instance that cannot record (its disk full) fails the step then, with the
cause, and nothing is published.

Orchestration layer: no geo import (pyarrow reads a footer, through the data root).
"""

import time
from collections.abc import Iterable
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    MetadataValue,
)

from geoiso_dagster import dataroot, paths
from geoiso_dagster.errors import GeoisoError

PUBLISHED_AS = "geoiso/published_as"
# A file is repaired only once it is this old: a run that is alive records what it
# published at once, but another run of the same partition (two at once are allowed)
# may be between its publish and its record right now.
RECORD_GRACE_S = 300.0
REPAIRED = "geoiso/repaired"


def stamp_entry(output: Path) -> dict:
    """The stamp of a just-published `output`, for its catalog entry."""
    stamp = dataroot.root().stamp(output, just_published=True)
    return {PUBLISHED_AS: MetadataValue.text(stamp)} if stamp else {}


def files_of(outputs: Iterable[Path]) -> list[tuple[str, str, Path]]:
    """(asset, partition, path) of each path that is an asset's output in the warehouse
    (reference layers and inbox sources are not the catalog's)."""
    warehouse = paths.warehouse_dir().resolve()
    found = []
    for path in outputs:
        if path.resolve().parent.parent != warehouse:
            continue
        asset, key = path.parent.name, path.name.rpartition(".")[0]
        found.append((asset, key, path))
    return found


def reconcile(context: AssetExecutionContext, files: list[tuple[str, str, Path]]) -> int:
    """Record each of `files` whose stamp no latest record of it has; how many."""
    instance, root = context.instance, dataroot.root()
    stamps = {}
    for asset, key, path in files:
        try:
            stamp = root.stamp(path)
            if stamp is not None and time.time() - root.published_at(path) >= RECORD_GRACE_S:
                stamps[asset, key] = stamp
        except (GeoisoError, OSError):
            continue  # storage that does not answer: the file's own work says so, retried
    records = _latest_records(instance, [k for k, s in stamps.items() if s is not None])
    repaired = 0
    for asset, key, path in files:
        stamp = stamps.get((asset, key))
        if stamp is None:
            continue
        latest = records.get((asset, key))
        if latest is not None:
            recorded = latest.get(PUBLISHED_AS)
            if recorded is None or getattr(recorded, "value", recorded) == stamp:
                continue  # a record from before stamps, or the file's own
        why = (
            f"{path.name} was published but never recorded (its run stopped in between)"
            if latest is None
            else f"{path.name} is not the file its latest record describes (a run "
            "published it and stopped before recording it)"
        )
        instance.report_runless_asset_event(
            AssetMaterialization(
                asset_key=AssetKey(asset),
                partition=key,
                metadata={
                    **_footer(root, path),
                    PUBLISHED_AS: MetadataValue.text(stamp),
                    REPAIRED: MetadataValue.text(f"{why}; recorded by run {context.run_id}"),
                },
            )
        )
        context.log.warning(
            f"{asset} {key}: the catalog disagreed with the file: {why}; recorded now as found"
        )
        repaired += 1
    return repaired


def _latest_records(instance, wanted: list[tuple[str, str]]) -> dict:
    """The metadata of the latest record of each (asset, partition) of `wanted` that has
    one: one query an asset for a batch's partitions (newest first, the first of each
    partition kept), one more a partition only for those a page did not reach."""
    found: dict = {}
    by_asset: dict[str, list[str]] = {}
    for asset, key in wanted:
        by_asset.setdefault(asset, []).append(key)
    for asset, keys in by_asset.items():
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=keys),
            limit=4 * len(keys),
        )
        for record in result.records:
            materialization = record.asset_materialization
            if materialization is not None:
                found.setdefault((asset, materialization.partition), dict(materialization.metadata))
        for key in keys if result.has_more else ():
            if (asset, key) not in found:
                single = instance.fetch_materializations(
                    AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[key]), limit=1
                )
                for record in single.records[:1]:
                    found[asset, key] = dict(record.asset_materialization.metadata)
    return found


def _footer(root, path: Path) -> dict:
    entry = {"path": MetadataValue.path(str(path))}
    try:
        entry["size_bytes"] = MetadataValue.int(path.stat().st_size)
        if path.suffix == ".parquet":
            entry["dagster/row_count"] = MetadataValue.int(
                root.parquet_metadata(str(path)).num_rows
            )
    except (OSError, ValueError, GeoisoError):  # a repair records what it can read
        pass
    return entry
