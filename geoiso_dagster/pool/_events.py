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
import time
import uuid
from collections.abc import Callable

_MAX_DATAGRAM = 65_000


def cancel_address(events_address: str, task_id: str) -> str:
    """The name a pool binds when it cancels task `task_id`: a worker that picks the task
    up later finds it bound and runs nothing (abstract namespace: no file)."""
    return f"{events_address}-cancelled-{task_id}"


class EventListener:
    """Receives worker events on a background thread and hands each to `on_event`."""

    def __init__(self, on_event: Callable[[dict], None]) -> None:
        self.address = f"\0geoiso-events-{os.getpid()}-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.2)
        self._on_event = on_event
        self._stopped = threading.Event()
        self._fences: dict[str, threading.Event] = {}
        self._markers: list[socket.socket] = []
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
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("type") == "fence":
                self._fences.pop(str(event.get("id")), threading.Event()).set()
                continue
            self._on_event(event)

    def fence(self, timeout: float = 5.0) -> bool:
        """Wait until every event queued before this call has been handled (datagrams of a
        socket are received in order); False if that took longer than `timeout`."""
        token, done = uuid.uuid4().hex, threading.Event()
        self._fences[token] = done
        sender = EventSender(self.address)
        try:
            if not sender.send({"type": "fence", "id": token}, wait_s=timeout):
                return False
        finally:
            sender.close()
        return done.wait(timeout)

    def mark_cancelled(self, task_id: str) -> None:
        """Bind the cancel address of `task_id` for as long as this listener lives."""
        marker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):  # bound already: cancelled twice
            marker.bind(cancel_address(self.address, task_id))
            self._markers.append(marker)
            return
        marker.close()

    def close(self) -> None:
        self._stopped.set()
        # Wake the loop now rather than at its next 0.2 s timeout: every pool's close
        # (a run's teardown) waited for that.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"", self.address)
        self._thread.join(timeout=2)
        self._sock.close()
        for marker in self._markers:
            marker.close()
        self._markers.clear()


class EventSender:
    """The worker's end: fire-and-forget, never blocks, never raises."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def send(self, event: dict, wait_s: float = 0.0) -> bool:
        """Send `event`; while the listener's queue is full, try again for up to `wait_s`
        (0: drop it at once). Whether it was sent."""
        data = json.dumps(event).encode()[:_MAX_DATAGRAM]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._sock.sendto(data, self._address)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
            except OSError:
                return False

    def bound(self, address: str) -> bool:
        """Whether some socket is bound at `address` (a cancel address, say)."""
        try:
            self._sock.sendto(b"", address)
        except BlockingIOError:
            return True  # bound, and its queue is full
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._sock.close()
