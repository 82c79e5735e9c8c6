"""The inbox sensor at scale: ticks over an inbox of N files, most already processed.

    .venv/bin/python -m benchmarks.inbox_scale [--files 10000] [--new 20] [--s3]

On a real (temporary, SQLite) Dagster instance, the real inbox_sensor is evaluated:
  cold     N new files: every file is looked at, N partitions and their batch runs planned
  idle     the same N files, nothing changed since
  some new N processed files plus --new new ones
  churn    the N files replaced by N others (N more seen in all)
Prints each tick's time and the cursor's size, and what the first version's cursor (one
entry per file ever seen) would weigh at that point, for comparison.

With --s3 the inbox is the prefix `inbox/` of s3://geo/inbox-bench on a local S3 API
server (moto, 127.0.0.1) started for the run: the same ticks, listing the bucket. Each
line then also gives the bare listing of the prefix with boto3's paginator (the
baseline: what any S3 inbox watcher pays) and the tick's ratio to it.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance, build_sensor_context

from benchmarks.results import recorded
from geoiso_dagster.definitions import defs
from geoiso_dagster.defs import sensors

os.environ.setdefault("GEOISO_INBOX_SETTLE_S", "0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--s3", action="store_true", help="the inbox in a bucket (moto)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "home").mkdir()
        if args.s3:
            with Bucket(root) as store:
                run(args, root, store)
        else:
            run(args, root, Folder(root / "data"))


class Folder:
    def __init__(self, data: Path) -> None:
        self.inbox = data / "inbox"
        self.inbox.mkdir(parents=True)
        os.environ["GEOISO_DATA_ROOT"] = str(data)

    def names(self) -> list[str]:
        return os.listdir(self.inbox)

    def add(self, names: list[str]) -> None:
        for name in names:
            (self.inbox / name).write_bytes(b"x")

    def remove_all(self) -> None:
        for name in self.names():
            os.unlink(self.inbox / name)


class Bucket:
    def __init__(self, root: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tests.harness.s3 import S3Server

        self.server = S3Server(root / "moto.log")
        os.environ.update(self.server.env("s3://geo/inbox-bench"))
        os.environ["GEOISO_SCRATCH_DIR"] = str(root / "scratch")
        self.client = self.server.client()
        self.client.create_bucket(Bucket="geo")
        self.threads = ThreadPoolExecutor(8)

    def __enter__(self) -> "Bucket":
        return self

    def __exit__(self, *exc) -> None:
        self.threads.shutdown()
        self.server.stop()

    def names(self) -> list[str]:
        from tests.harness.s3 import objects

        return [k.rpartition("/")[2] for k in objects(self.client, "geo", "inbox-bench/inbox/")]

    def add(self, names: list[str]) -> None:
        put = self.client.put_object
        keys = [f"inbox-bench/inbox/{n}" for n in names]
        list(self.threads.map(lambda k: put(Bucket="geo", Key=k, Body=b"x"), keys))

    def remove_all(self) -> None:
        keys = [f"inbox-bench/inbox/{n}" for n in self.names()]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket="geo", Delete={"Objects": batch})


def run(args, root: Path, store) -> None:
    """The six ticks on `store` (a Folder or a Bucket)."""
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
        listed = time.perf_counter()
        names = store.names()
        listing = time.perf_counter() - listed
        for name in names:
            ever_seen.setdefault(name, "0123456789abcdef")
        first_version = len(json.dumps(ever_seen, sort_keys=True))
        print(
            f"{label:<9} {len(names):>7} files  tick {took:6.2f} s  "
            f"{len(runs):>4} runs for {files:>6} files  cursor {len(result.cursor):>6} B "
            f"(first version's: {first_version:,} B)"
        )
        if isinstance(store, Bucket):
            print(f"{'':<9} bare listing {listing:5.2f} s; tick / listing {took / listing:4.2f}x")
        return result.cursor

    def add(prefix: str, count: int) -> None:
        store.add([f"{prefix}_{i:06d}.gpkg" for i in range(count)])

    add("tile", args.files)
    cursor = tick("cold", None)
    time.sleep(sensors.CLOCK_MARGIN_S + 0.1)
    cursor = tick("idle", cursor)
    add("late", args.new)
    cursor = tick("some new", cursor)
    time.sleep(sensors.CLOCK_MARGIN_S + 0.1)
    cursor = tick("idle", cursor)
    store.remove_all()
    add("next", args.files)
    cursor = tick("churn", cursor)
    time.sleep(sensors.CLOCK_MARGIN_S + 0.1)
    tick("idle", cursor)


if __name__ == "__main__":
    with recorded("inbox_scale"):
        main()
