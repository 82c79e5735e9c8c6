"""geoiso-dagster's worker pool from plain asyncio, without Dagster: clip several
GeoParquet files to one mask side by side, each in an isolated worker process (the
environment set before GDAL loads, a memory ceiling, a timeout that kills).

    python examples/plain_asyncio/clip_many.py MASK.parquet A.parquet B.parquet ...

Writes A.clipped.parquet, ... beside each input and prints one line per file.
"""

import asyncio
import sys
from pathlib import Path

from geoiso_dagster.pool import PoolSettings, WorkerPool


async def clip_all(mask: str, sources: list[str]) -> list:
    settings = PoolSettings(max_workers=2, memory_limit_mb=2048, task_timeout_s=600)
    async with WorkerPool(settings) as pool:  # or pool = WorkerPool(...).start() ... close()
        return await asyncio.gather(
            *(
                pool.run_async(
                    "geoiso_dagster.ops:clip",
                    source=source,
                    output=str(Path(source).with_suffix(".clipped.parquet")),
                    mask=mask,
                )
                for source in sources
            )
        )


def main(argv: list[str]) -> None:
    mask, *sources = argv
    for source, result in zip(sources, asyncio.run(clip_all(mask, sources)), strict=True):
        facts = result.facts
        sys.stdout.write(
            f"{source}: {facts['rows']} rows -> {facts['path']} "
            f"(worker {result.pid}, {result.duration_s:.2f} s, peak {result.peak_rss_mb} MB)\n"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
