"""The memory cgroup this process runs in (a run container's, in a deployment).

A run container's limit is max_workers x memory_limit_mb plus the run process, so the
workers' own ceilings stop them first. When the container's limit is hit anyway (set
lower by an operator, or the run process grew), the kernel's OOM killer chooses; workers
volunteer (oom_score_adj), so the run process survives to report it, and the pool tells
that SIGKILL apart from any other by the cgroup's oom_kill count. Linux cgroup v1 and v2.
No geo imports.
"""

from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")
# Above this the "limit" is the kernel's way of saying none (v1 reports 2**63 rounded).
_NO_LIMIT = 2**60
# Workers are what the OOM killer should take first: they are restartable, the run
# process holds the run. An unprivileged process may raise its own score; at the
# maximum, a worker is always chosen before any process that did not raise its own.
WORKER_OOM_SCORE_ADJ = 1000


def memory_limit_mb() -> int | None:
    """This cgroup's memory limit in MB, or None when there is none."""
    for path in (_ROOT / "memory.max", _ROOT / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _NO_LIMIT:
            return int(text) // 2**20
        return None
    return None


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed in this cgroup (0 if not
    known)."""
    for path in (_ROOT / "memory.events", _ROOT / "memory" / "memory.oom_control"):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return 0


def volunteer_for_oom_killer() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text(str(WORKER_OOM_SCORE_ADJ))
    except OSError:
        pass
