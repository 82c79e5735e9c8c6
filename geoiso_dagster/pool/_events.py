"""A one-way message channel from workers to the pool: a datagram socket.

Datagrams are written whole or not at all and need no lock, so a worker killed
while sending cannot wedge the channel for the others (a multiprocessing queue's
shared write lock can). The socket lives in Linux's abstract namespace: no file.
"""

import contextlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable

_MAX_DATAGRAM = 65_000


class EventListener:
    """Receives worker events on a background thread and hands each to `on_event`."""

    def __init__(self, on_event: Callable[[dict], None]) -> None:
        self.address = f"\0geoiso-events-{os.getpid()}-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.2)
        self._on_event = on_event
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="geoiso-events", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._on_event(json.loads(data))
            except ValueError:
                continue

    def close(self) -> None:
        self._stopped.set()
        # Wake the loop now rather than at its next 0.2 s timeout: every pool's close
        # (a run's teardown) waited for that.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"", self.address)
        self._thread.join(timeout=2)
        self._sock.close()


class EventSender:
    """The worker's end: fire-and-forget, never blocks, never raises."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def send(self, event: dict) -> None:
        try:
            self._sock.sendto(json.dumps(event).encode()[:_MAX_DATAGRAM], self._address)
        except OSError:
            pass
