"""A task that plays code execution inside a worker after a parser bug (tests/test_sandbox.py).

It tries what such code would: read files outside its inputs, write outside its folder,
reach the network, start a program, signal and trace other processes. Each attempt is
reported, never raised: "refused (<errno name>)" when the kernel refused it, "ALLOWED"
otherwise. What it aims at comes in the environment (GEOISO_TEST_HOSTILE, a JSON object),
not in its arguments: an argument naming a file is an input the task may read.
"""

import ctypes
import errno
import json
import os
import signal
import socket

_PTRACE_ATTACH = 16
_SYS_PTRACE = 101  # x86_64


def _attempt(action) -> str:
    try:
        action()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return (
            f"refused ({name})" if exc.errno in (errno.EACCES, errno.EPERM) else f"failed ({name})"
        )
    return "ALLOWED"


def _read(path: str):
    return lambda: open(path, "rb").read(1)


def _write(path: str):
    def write():
        with open(path, "ab") as out:
            out.write(b"pwned")

    return write


def _connect(port: int):
    def connect():
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass

    return connect


def _execute():
    """execve /bin/sh in a fork: refused, the fork exits with the errno; run, it exits 0."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/sh", ["sh", "-c", "exit 0"])
        except OSError as exc:
            os._exit(exc.errno or 1)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        raise OSError(code, os.strerror(code))


def _ptrace(pid: int):
    def attach():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_PTRACE, _PTRACE_ATTACH, pid, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return attach


def _signal(pid: int, signum: int):
    return lambda: os.kill(pid, signum)


def take_over(source: str, output: str, pids: dict, port: int, bucket_port: int = 0) -> dict:
    targets = json.loads(os.environ["GEOISO_TEST_HOSTILE"])
    sibling = next(p for p in pids["workers"] if p != os.getppid())
    attempts = {
        "its own input": _attempt(_read(source)),
        "a secret outside the root": _attempt(_read(targets["secret"])),
        "another partition's source": _attempt(_read(targets["other_source"])),
        "another partition's output": _attempt(_read(targets["other_output"])),
        "the instance's SQLite file": _attempt(_read(targets["instance_db"])),
        "listing DAGSTER_HOME": _attempt(lambda: os.listdir(targets["dagster_home"])),
        "the run process's environment": _attempt(_read(f"/proc/{pids['run']}/environ")),
        "writing outside its folder": _attempt(_write(targets["write_outside"])),
        "writing another partition's output": _attempt(_write(targets["other_output"])),
        "a TCP connection to the test's server": _attempt(_connect(port)),
        "starting /bin/sh": _attempt(_execute),
        # Signal 0 is the kernel's permission check without a signal: the run process is
        # this test's, a SIGKILL that went through would end the test run.
        "signalling the run process": _attempt(_signal(pids["run"], 0)),
        "signalling its worker": _attempt(_signal(os.getppid(), 0)),
        "killing the forkserver": _attempt(_signal(pids["forkserver"], signal.SIGKILL)),
        "killing the sibling worker": _attempt(_signal(sibling, signal.SIGKILL)),
        "tracing the sibling worker": _attempt(_ptrace(sibling)),
        "a new unix socket": _attempt(lambda: socket.socket(socket.AF_UNIX).close()),
    }
    if bucket_port:
        attempts["a TCP connection to the bucket's port"] = _attempt(_connect(bucket_port))
    with open(output, "wb") as out:  # its own output, which it may write
        out.write(b"made in the sandbox")
    attempts["its own output"] = "ALLOWED"
    return {"attempts": attempts}
