"""The catalog and the files agree, after any kill.

A step publishes a file (an atomic rename, or an object copied into place) and then the
catalog records it: the two are not one transaction, and a run killed between them left
the catalog describing the previous file, or (a batch) published files with no record.
So every materialization carries its file's stamp (`PUBLISHED_AS`: the inode, size and
mtime of a local file, the ETag of an object, as the data root tells them), and before a
step works on its files, it compares each file it reads or writes (its upstream outputs,
its own previous output) with the latest record of it: a file there whose stamp no record
has is recorded now, as found on disk (rows and size from its own footer), marked
`geoiso/repaired` with why, and the run log says so. Records made before stamps existed
are taken as they are. Before publishing, the step also writes to the catalog (a log
line): an instance that cannot record (its disk full) fails the step then, with the
cause, and nothing is published.

Orchestration layer: no geo import (pyarrow reads a footer, through the data root).
"""

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
    repaired = 0
    for asset, key, path in files:
        try:
            stamp = root.stamp(path)
        except GeoisoError:
            continue  # storage that does not answer: the file's own work says so, retried
        if stamp is None:
            continue
        latest = _latest(instance, asset, key)
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


def _latest(instance, asset: str, key: str) -> dict | None:
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[key]), limit=1
    )
    if not result.records:
        return None
    materialization = result.records[0].asset_materialization
    return dict(materialization.metadata) if materialization else {}


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
