"""The kernel's sandbox around every task (docs/security.md).

A worker runs each task in a child it forks for that task (warm: the geo stack is
loaded, PROJ and Arrow have paid their first-use costs), and that child, single-threaded,
confines itself before it runs a line of the task:

- Landlock (landlockpy): it reads only the Python environment, the geo stack's data and
  the system's libraries, certificates and name-service files, plus the task's own inputs
  (each path the task is given, with the files its format opens beside it); it writes only
  the task's private folder (which the worker made for it, and from which the worker
  moves the output to its staged name when the task succeeded); it executes nothing;
  it connects to no TCP port, except the bucket endpoint's when the root is a bucket;
  it signals, traces and reaches the abstract sockets of no process outside itself;
- it gives up every capability (a root worker too), and sets no_new_privs;
- seccomp (pyseccomp, over libseccomp) refuses what Landlock does not cover: every new
  socket but TCP/IP ones of a bucket root (none at all for a local root), UDP too when
  the endpoint is an address, and the kernel's own attack surface (ptrace,
  process_vm_*, bpf, perf_event_open, io_uring, user namespaces, keys, modules, mounts).

Then it checks its confinement (`weaknesses`) and refuses the task if it is weaker than
configured. The child holds no socket and no pipe of the worker's (the pool's channels
among them): it tells the worker its progress and its outcome as JSON lines on a pipe of
its own, so nothing it writes is unpickled anywhere.

GEOISO_POOL_SANDBOX: "auto" (the default: on where the kernel has Landlock ABI 6, else
off, and every step says so), "on" (refuse to run without it), "off".
No geo imports.
"""

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import stat
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from geoiso_dagster import formats
from geoiso_dagster.inbox import CONFIG_SIDECAR_SUFFIX as SIDECAR_SUFFIX

MODES = ("auto", "on", "off")
# Landlock ABI 6: files (1), linking across folders (2), truncation (3), TCP ports (4),
# device ioctls (5), scoped signals and abstract unix sockets (6).
REQUIRED_ABI = 6

# System files a task may read beyond the Python environment (kept short: no /etc as a
# whole, whose shadow file a root worker could read otherwise).
SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/etc/mime.types",
)
DEVICES_READ = ("/dev/urandom", "/dev/random", "/dev/zero")
DEVICES_WRITE = ("/dev/null",)
# The kernel's attack surface that Landlock leaves open.
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_open",
    "pidfd_getfd",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "syslog",
    "personality",
    "execve",
    "execveat",
)


class SandboxError(Exception):
    """The sandbox could not be set up, or is weaker than configured."""


def support() -> str | None:
    """None when this kernel and environment can confine tasks; else why not."""
    try:
        import landlockpy
        import pyseccomp  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"the sandbox's libraries cannot be loaded ({exc})"
    try:
        abi = landlockpy.abi_version()
    except (OSError, landlockpy.LandlockError) as exc:  # a seccomp profile refusing it
        return f"the kernel refuses Landlock here ({exc})"
    if abi < REQUIRED_ABI:
        return f"the kernel's Landlock ABI is {abi}; the sandbox needs {REQUIRED_ABI}"
    return None


@dataclass(frozen=True)
class Policy:
    """What a worker's tasks are confined to (the same for every task of a pool)."""

    on: bool
    summary: str  # what the catalog and the run log show
    reads: tuple[str, ...] = ()
    tcp_ports: tuple[int, ...] = ()  # TCP ports a task may connect to
    udp: bool = False  # name lookups of a bucket endpoint given by host name


def decide(
    mode: str,
    endpoint: str | None = None,
    protected: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Policy:
    """The policy of a worker whose setting is `mode`, for a root read over `endpoint`
    (a bucket's URL; None: a local root), in environment `env`. No system grant may hold
    one of `protected` (DAGSTER_HOME, the data root, the home folder): such a grant is
    left out. A bucket root's tasks read the AWS files the standard chain reads (the
    shared credentials and config files, a web identity token, a CA bundle)."""
    if mode not in MODES:
        raise ValueError(f"GEOISO_POOL_SANDBOX must be one of {MODES}: {mode!r}")
    if mode == "off":
        return Policy(False, "off: GEOISO_POOL_SANDBOX=off")
    missing = support()
    if missing:
        if mode == "on":
            raise SandboxError(
                f"GEOISO_POOL_SANDBOX=on, but {missing}: set GEOISO_POOL_SANDBOX=off to run "
                "the workers unconfined"
            )
        return Policy(False, f"off: {missing}")
    import landlockpy

    ports: tuple[int, ...] = ()
    udp = False
    if endpoint:
        parts = urlsplit(endpoint)
        ports = (parts.port or (443 if parts.scheme == "https" else 80),)
        try:
            ipaddress.ip_address(parts.hostname or "")
        except ValueError:
            udp = True  # its name must be looked up
    net = f"TCP to port {ports[0]} only" if ports else "no network"
    reads = system_reads(protected)
    if endpoint:
        reads += readable(aws_files(env if env is not None else dict(os.environ)), protected)
    return Policy(
        True,
        f"on: Landlock ABI {landlockpy.abi_version()}, seccomp, no capabilities, {net}",
        reads=reads,
        tcp_ports=ports,
        udp=udp,
    )


def aws_files(env: dict[str, str]) -> list[str]:
    """The files the AWS credential chain reads, as `env` names them (or their defaults)."""
    aws = Path(env.get("HOME") or Path.home()) / ".aws"
    return [
        env.get("AWS_SHARED_CREDENTIALS_FILE") or str(aws / "credentials"),
        env.get("AWS_CONFIG_FILE") or str(aws / "config"),
        *(env[k] for k in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE") if env.get(k)),
    ]


def system_reads(protected: tuple[str, ...]) -> tuple[str, ...]:
    """The folders and files every task may read: the system's, Python's (the standard
    library, this environment's packages, this package), the geo stack's data."""
    paths = sysconfig.get_paths()
    candidates = [
        *SYSTEM_READ,
        *DEVICES_READ,
        paths["stdlib"],
        paths["platstdlib"],
        paths["purelib"],
        paths["platlib"],
        sys.prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        str(Path(__file__).resolve().parents[1]),  # geoiso_dagster (an editable install)
        *(os.environ[k] for k in ("GDAL_DATA", "PROJ_DATA", "PROJ_LIB") if k in os.environ),
    ]
    return readable(candidates, protected)


def readable(candidates: list[str], protected: tuple[str, ...]) -> tuple[str, ...]:
    """The real paths of `candidates` that exist and hold none of `protected`."""
    kept: list[str] = []
    guarded = [Path(p).resolve() for p in protected if p]
    for candidate in candidates:
        try:
            real = Path(candidate).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if any(g == real or g.is_relative_to(real) for g in guarded):
            continue  # it would hold what no task may read
        if str(real) not in kept:
            kept.append(str(real))
    return tuple(kept)


def protected_paths(env: dict[str, str], local_root: str) -> tuple[str, ...]:
    """What no system grant may contain: the instance's home, the data root's folder (a
    bucket's mirror), the home folder, the scratch folder."""
    found = [env.get("DAGSTER_HOME", ""), str(Path.home()), env.get("GEOISO_SCRATCH_DIR", "")]
    return tuple(p for p in [*found, local_root] if p)


def task_reads(kwargs: dict) -> list[str]:
    """The files a task may read: each absolute local path among its arguments (in lists
    and dicts too), a file with the files its format opens beside it and its sidecar, a
    folder as a whole (a private folder of the orchestrator's)."""
    found: list[str] = []

    def visit(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, (str, Path)) and os.path.isabs(str(value)):
            path = Path(value)
            if not os.path.lexists(path):
                return
            found.append(str(path))
            if path.is_file():
                beside = [*formats.companion_names(path.name), path.name + SIDECAR_SUFFIX]
                found.extend(str(path.parent / n) for n in beside if (path.parent / n).exists())

    visit(kwargs)
    return found


# Rights of the task's private folder: everything but executing, devices, links out.
def _write_rights():
    from landlockpy import AccessFS

    return (
        AccessFS.READ_FILE
        | AccessFS.READ_DIR
        | AccessFS.WRITE_FILE
        | AccessFS.TRUNCATE
        | AccessFS.MAKE_REG
        | AccessFS.MAKE_DIR
        | AccessFS.REMOVE_FILE
        | AccessFS.REMOVE_DIR
        | AccessFS.REFER
    )


def fault_grants(env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(reads, writes) the test faults set in `env` need (GEOISO_FAULTS, spatial/faults.py:
    their state folders; a swap's or a fill's folders, as the other process they play
    would write them). Production never sets the variable."""
    import json

    try:
        faults = json.loads(env.get("GEOISO_FAULTS") or "[]")
    except ValueError:
        return [], []
    reads, writes = [], []
    for fault in faults if isinstance(faults, list) else []:
        if not isinstance(fault, dict):
            continue
        if isinstance(fault.get("state"), str):
            Path(fault["state"]).mkdir(parents=True, exist_ok=True)
            writes.append(fault["state"])
        if isinstance(fault.get("armed"), str):
            reads.append(str(Path(fault["armed"]).parent))
        if fault.get("fault") in ("swap", "fill"):
            writes += [str(Path(fault[k]).parent) for k in ("from", "path") if k in fault]
    return reads, writes


def confine(policy: Policy, reads: list[str], folder: str, writes: tuple[str, ...] = ()) -> None:
    """Confine this process (single-threaded: a task's child) for good."""
    import landlockpy
    from landlockpy import AccessFS, AccessNet, Scope

    read_file = AccessFS.READ_FILE
    read_tree = AccessFS.READ_FILE | AccessFS.READ_DIR
    handled_fs = landlockpy.fs_for_abi(landlockpy.abi_version())
    ruleset = landlockpy.Ruleset(
        handled_fs=handled_fs,
        handled_net=AccessNet.BIND_TCP | AccessNet.CONNECT_TCP,
        scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL,
        best_effort=False,
    )
    with ruleset:
        for path in [*policy.reads, *reads, f"/proc/{os.getpid()}"]:
            with contextlib.suppress(FileNotFoundError):
                ruleset.allow_path(path, read_tree if os.path.isdir(path) else read_file)
        for path in DEVICES_WRITE:
            ruleset.allow_path(path, read_file | AccessFS.WRITE_FILE)
        ruleset.allow_path(folder, _write_rights())
        for path in writes:  # a bucket mirror's folder; a test fault's (a swap moves a link)
            with contextlib.suppress(FileNotFoundError):
                ruleset.allow_path(path, _write_rights() | AccessFS.MAKE_SYM)
        for port in policy.tcp_ports:
            ruleset.allow_port(port, AccessNet.CONNECT_TCP)
        ruleset.restrict()  # sets no_new_privs first
    _drop_capabilities()
    _load_seccomp(_compiled.get(policy) or compile_seccomp(policy))


_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities() -> None:
    """No capability left, none to gain (the bounding and ambient sets emptied)."""
    libc = ctypes.CDLL(None, use_errno=True)
    last = (
        int(Path("/proc/sys/kernel/cap_last_cap").read_text()) if _cap_last is None else _cap_last
    )
    for cap in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: none to drop
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise SandboxError(f"could not drop capabilities: {os.strerror(ctypes.get_errno())}")


_cap_last: int | None = None


_compiled: dict[Policy, bytes] = {}


def prepare(policy: Policy) -> None:
    """What confining needs done before it may not (in the worker, before any fork): the
    last capability's number read, the seccomp filter compiled (pyseccomp finds
    libseccomp with ldconfig, a program to run)."""
    global _cap_last
    _cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    import landlockpy  # noqa: F401

    _compiled[policy] = compile_seccomp(policy)


# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME.
_NEW_NAMESPACE_FLAGS = (
    0x20000,
    0x2000000,
    0x4000000,
    0x8000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x80,
)


def compile_seccomp(policy: Policy) -> bytes:
    """The seccomp filter of `policy` as a BPF program, compiled once per worker by
    libseccomp (its rules below) and loaded by each task's process in microseconds."""
    import tempfile

    import pyseccomp as seccomp

    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    # clone3 takes its flags in memory, which a filter cannot read: glibc falls back to
    # clone on ENOSYS, whose flags it can, and no new namespace is allowed there.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in _NEW_NAMESPACE_FLAGS:
        rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    for name in DENIED_SYSCALLS:
        try:
            rules.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):
            continue  # not a system call of this architecture
    if not policy.tcp_ports:
        rules.add_rule(deny, "socket")
    else:
        # TCP/IP only: every family below AF_INET6 but AF_INET, and every one above it.
        rules.add_rule(deny, "socket", seccomp.Arg(0, seccomp.LT, socket.AF_INET))
        rules.add_rule(deny, "socket", seccomp.Arg(0, seccomp.GT, socket.AF_INET6))
        for family in range(socket.AF_INET + 1, socket.AF_INET6):
            rules.add_rule(deny, "socket", seccomp.Arg(0, seccomp.EQ, family))
        rules.add_rule(deny, "socket", seccomp.Arg(1, seccomp.MASKED_EQ, 0xF, socket.SOCK_RAW))
        if not policy.udp:
            rules.add_rule(
                deny, "socket", seccomp.Arg(1, seccomp.MASKED_EQ, 0xF, socket.SOCK_DGRAM)
            )
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def _load_seccomp(program: bytes) -> None:
    """Load a compiled filter (no_new_privs is set: Landlock's restrict set it)."""
    if not program or len(program) % 8:
        raise SandboxError("no seccomp program was compiled for this worker")
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise SandboxError(f"seccomp filter refused: {os.strerror(ctypes.get_errno())}")


def weaknesses(policy: Policy, parent: int) -> list[str]:
    """What of `policy` this process is not held to (none: it is confined): probes that
    each must fail, by the kernel's refusal."""
    found = []

    def refused(what: str, attempt) -> None:
        try:
            attempt()
        except PermissionError:
            return
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return
            found.append(f"{what}: failed otherwise ({exc})")
            return
        found.append(f"{what}: allowed")

    refused("listing /", lambda: os.close(os.open("/", os.O_RDONLY | os.O_DIRECTORY)))
    refused("signalling the worker", lambda: os.kill(parent, 0))
    if not policy.tcp_ports:
        refused("a TCP socket", lambda: socket.socket().close())
    else:
        refused("binding a TCP port", lambda: _bind_any())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(21, 0, 0, 0, 0) != 2:  # PR_GET_SECCOMP: 2 is filter mode
        found.append("seccomp: no filter")
    if libc.prctl(23, 21, 0, 0, 0) != 0:  # PR_CAPBSET_READ CAP_SYS_ADMIN
        found.append("capabilities: CAP_SYS_ADMIN still in the bounding set")
    return found


def _bind_any() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))


def close_inherited(keep: set[int]) -> None:
    """Close every socket and pipe this process inherited but `keep` (the pool's channels
    among them: what a task wrote there, the run process would unpickle)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd <= 2:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
            with contextlib.suppress(OSError):
                os.close(fd)
