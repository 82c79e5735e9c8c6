"""The inbox sensor at scale: ticks over an inbox of N files, most already processed.

    .venv/bin/python -m benchmarks.inbox_scale [--files 10000] [--new 20]

On a real (temporary, SQLite) Dagster instance, the real inbox_sensor is evaluated:
  cold     N new files: every file is looked at, N partitions and their batch runs planned
  idle     the same N files, nothing changed since
  some new N processed files plus --new new ones
  churn    the N files replaced by N others (N more seen in all)
Prints each tick's time and the cursor's size, and what the first version's cursor (one
entry per file ever seen) would weigh at that point, for comparison.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance, build_sensor_context

from geoiso_dagster.definitions import defs
from geoiso_dagster.defs import sensors

os.environ.setdefault("GEOISO_INBOX_SETTLE_S", "0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = root / "data" / "inbox"
        inbox.mkdir(parents=True)
        os.environ["GEOISO_DATA_ROOT"] = str(root / "data")
        (root / "home").mkdir()
        sensor = defs.resolve_sensor_def("inbox_sensor")
        instance = DagsterInstance.from_config(str(root / "home"))
        ever_seen: dict[str, str] = {}

        def tick(label: str, cursor: str | None) -> str:
            context = build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
            started = time.perf_counter()
            result = sensor(context)
            took = time.perf_counter() - started
            runs = result.run_requests or []
            files = sum(int(r.tags.get(sensors.BATCH_TAG, "1")) for r in runs)
            for name in os.listdir(inbox):
                ever_seen.setdefault(name, "0123456789abcdef")
            first_version = len(json.dumps(ever_seen, sort_keys=True))
            print(
                f"{label:<9} {len(os.listdir(inbox)):>7} files  tick {took:6.2f} s  "
                f"{len(runs):>4} runs for {files:>6} files  cursor {len(result.cursor):>6} B "
                f"(first version's: {first_version:,} B)"
            )
            return result.cursor

        def add(prefix: str, count: int) -> None:
            for i in range(count):
                (inbox / f"{prefix}_{i:06d}.gpkg").write_bytes(b"x")

        add("tile", args.files)
        cursor = tick("cold", None)
        time.sleep(sensors.CLOCK_MARGIN_S + 0.1)
        cursor = tick("idle", cursor)
        add("late", args.new)
        cursor = tick("some new", cursor)
        time.sleep(sensors.CLOCK_MARGIN_S + 0.1)
        cursor = tick("idle", cursor)
        for name in os.listdir(inbox):
            os.unlink(inbox / name)
        add("next", args.files)
        cursor = tick("churn", cursor)
        time.sleep(sensors.CLOCK_MARGIN_S + 0.1)
        tick("idle", cursor)


if __name__ == "__main__":
    main()
