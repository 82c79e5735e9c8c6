"""Tasks that read a source into GeoParquet: ingest (whole, or one range of a fan-out),
its survey, and the concatenation of a fan-out's parts."""

import time
from pathlib import Path

from geoiso_dagster.fsutil import atomic_path
from geoiso_dagster.spatial import faults, io, stream
from geoiso_dagster.spatial.ingest import ingest_file
from geoiso_dagster.spatial.ingest import survey as ingest_survey
from geoiso_dagster.task_api import progress


def ingest(
    source: str,
    output: str,
    features: list[int] | None = None,
    layer: str | None = None,
    identity: list | None = None,
) -> dict:
    """raw_features: any vector file or GeoParquet -> GeoParquet, unchanged, streamed in
    batches (see spatial/ingest.py). With `features` = [skip, count] (GDAL sources) or
    [first row group, row groups] (GeoParquet), only that range: one part of a fan-out,
    whose source must be the file the survey saw (`identity`)."""
    faults.at_start("ingest")
    started = time.perf_counter()
    last = [time.monotonic()]

    def report(rows: int, expected: int | None) -> None:
        if time.monotonic() - last[0] >= 1.0:
            of = f" of {expected}" if expected is not None else ""
            progress(
                f"read {rows}{of} features from {_name(source)}",
                done=rows,
                total=expected,
                unit="features",
            )
            last[0] = time.monotonic()

    try:
        with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
            written = ingest_file(
                io.ref(source),
                tmp,
                features,
                on_batch=report,
                part=features is not None,
                layer=layer,
                identity=identity,
            )
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    progress(
        f"read and wrote {written['rows']} features from {_name(source)} "
        f"in {time.perf_counter() - started:.2f} s",
        features=written["rows"],
    )
    if features is not None:  # a part file: its facts go to `concatenate`
        return {
            "path": output,
            "rows": written["rows"],
            "geo": written["geo"],
            "runs": written["runs"],
        }
    return io.describe(Path(output))


def _name(source: str) -> str:
    return source.rpartition("/")[2]


def survey(source: str, layer: str | None = None, scratch: str | None = None) -> dict:
    """How many features a source holds and whether ranges of them can be read alone
    (pinned beside `scratch`, the output, and its identity given: spatial/ingest.py)."""
    faults.at_start("survey")
    return ingest_survey(io.ref(source), layer, scratch)


def concatenate(
    parts: list[str],
    output: str,
    runs: list[list[list[int]]],
    geos: list[dict] | None = None,
) -> dict:
    """Join the parts of a fan-out into `output` (atomically), their sorted runs (`runs`,
    see stream.TableSink) merged in Hilbert order; `geos`: the parts' `geo` metadata when
    their files do not carry it (ingest parts)."""
    faults.at_start("concatenate")
    try:
        with atomic_path(Path(output)) as tmp, faults.around_write(tmp):
            stream.concatenate([Path(p) for p in parts], tmp, runs, geos)
    except OSError as exc:
        raise io.os_error(Path(output), exc, "writing") from exc
    return io.describe(Path(output))
