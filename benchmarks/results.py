"""Where the benchmarks' figures live: each benchmark writes what it printed to
benchmarks/results/<name>.txt, with when, on what machine, at which commit and by which
command it was measured. docs/benchmarks.md points at these files and copies no figure.

    if __name__ == "__main__":
        with recorded("run"):
            main()

Arguments after the module name are part of the file's name (`benchmarks.s3_root
--hosts` writes s3_root--hosts.txt), so each variant keeps its own last figures. A run
that fails writes nothing: a results file holds only a finished measurement.
"""

import contextlib
import io
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB, {platform.platform()}"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def results_file(name: str, argv: list[str]) -> Path:
    suffix = "".join(f"-{re.sub(r'[^A-Za-z0-9_.-]', '_', arg)}" for arg in argv)
    return RESULTS / f"{name}{suffix}.txt"


@contextlib.contextmanager
def recorded(name: str, argv: list[str] | None = None) -> Iterator[None]:
    """Print as usual, and when the block ends without an error, write what was printed
    to the benchmark's results file."""
    argv = sys.argv[1:] if argv is None else argv
    captured = io.StringIO()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, captured)
    try:
        yield
    finally:
        sys.stdout = stdout
    header = (
        f"# python -m benchmarks.{name} {' '.join(argv)}".rstrip()
        + f"\n# measured {started}, commit {_commit()}\n# machine: {_machine()}\n\n"
    )
    target = results_file(name, argv)
    target.parent.mkdir(exist_ok=True)
    target.write_text(header + captured.getvalue())
    shown = target.relative_to(Path.cwd()) if target.is_relative_to(Path.cwd()) else target
    stdout.write(f"(written to {shown})\n")
