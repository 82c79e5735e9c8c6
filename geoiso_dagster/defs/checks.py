"""The blocking asset check: each output is read back by a worker and judged before
anything downstream runs. A failed check fails the step, so downstream is skipped.

One check per asset, `integrity`, judges every criterion of that asset and shows each
verdict in its metadata. One check, not one per criterion, because every check result is
an event the instance writes for every file: with a check per criterion (14 for the three
assets) the writes cost more than the geo work of a small file (benchmarks/small_files.py
counts the events and their cost)."""

import warnings

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue
from dagster._utils.warnings import PreviewWarning  # not exported; the one to silence here

from geoiso_dagster.defs.outputs import OutputKind
from geoiso_dagster.defs.partitions import source_files
from geoiso_dagster.records import OutputFacts, ReadBack

CHECK = "integrity"


def criteria_of(asset: str, criteria: tuple[str, ...], kind: OutputKind) -> tuple[str, ...]:
    """`criteria`, checked against what the output kind can judge."""
    unknown = [name for name in criteria if name not in kind.criteria]
    if unknown or not criteria:
        raise ValueError(
            f"{asset}: unknown check criteria {unknown}; known for {kind.name}: "
            f"{tuple(kind.criteria)}"
        )
    return tuple(criteria)


def check_specs(asset: str, criteria: tuple[str, ...], kind: OutputKind) -> list[AssetCheckSpec]:
    # Partitioned check specs are a Dagster preview feature (pinned: dagster <1.14); they
    # are what makes a check result say which source file it is about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return [
            AssetCheckSpec(
                CHECK,
                asset=asset,
                description=description(criteria, kind),
                blocking=True,
                partitions_def=source_files,  # results per source file, like the asset's
            )
        ]


def description(criteria: tuple[str, ...], kind: OutputKind) -> str:
    listed = "\n".join(f"- `{name}`: {kind.criteria[name]}" for name in criteria)
    return f"The file as written, read back by a worker, meets every criterion:\n{listed}"


def verdicts(
    written: OutputFacts, seen: ReadBack, criteria: tuple[str, ...], kind: OutputKind
) -> dict[str, tuple[bool, dict]]:
    """Each criterion: (passed, what was compared); every one fails on an unreadable file."""
    if not seen.get("readable"):
        unreadable = {"error": seen.get("error", "unreadable")}
        return {name: (False, unreadable) for name in criteria}
    return {name: kind.judge(name, written, seen) for name in criteria}


def check_results(
    asset: str, written: OutputFacts, seen: ReadBack, criteria: tuple[str, ...], kind: OutputKind
) -> list[AssetCheckResult]:
    """The asset's check result, from the step's facts and the worker's read-back: passed
    when every criterion passed; each criterion's verdict and values in the metadata."""
    judged = verdicts(written, seen, criteria, kind)
    failed = [name for name, (passed, _) in judged.items() if not passed]
    metadata = {"failed": ", ".join(failed) or "none"}
    for name, (passed, values) in judged.items():
        metadata[name] = MetadataValue.json({"passed": passed, **values})
    return [
        AssetCheckResult(
            asset_key=AssetKey(asset),
            check_name=CHECK,
            passed=not failed,
            severity=AssetCheckSeverity.ERROR,
            metadata=metadata,
        )
    ]
