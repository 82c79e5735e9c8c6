"""A real S3 API server on 127.0.0.1 for the tests: moto's standalone server (the one the
S3 clients' own test suites use), started in its own process group and stopped with it.

`S3Server.env(...)` is the environment a process needs to use it through the standard
AWS variables only (endpoint, region, credentials), as a user would set them.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
# Credentials of the tests: recognisable, so a test can prove they never leak.
ACCESS_KEY = "AKIAGEOISOTESTKEY0001"
SECRET_KEY = "geoiso-test-secret-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, log: Path, enforce_auth: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        if enforce_auth:
            # moto checks signatures and keys (IAM) from the first request on: a key it
            # does not know gets 403 InvalidAccessKeyId, as from AWS.
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {log}") from None
                time.sleep(0.1)

    def env(self, root: str | None = None, **extra) -> dict[str, str]:
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            # no ~/.aws of whoever runs the tests
            "AWS_CONFIG_FILE": "/nonexistent/geoiso-tests",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/geoiso-tests",
        }
        if root:
            env["GEOISO_DATA_ROOT"] = root
        env.update(extra)
        return env

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset call)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def objects(client, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object under `prefix`: key -> size."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def open_uploads(client, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that answers the first
    `failures` requests `matches(method, path_and_query)` selects with a 500
    InternalError (what S3 returns in an outage), forwards everything else, and records
    every request (method, path, Range header) in `requests`."""

    def __init__(self, target: str, matches, failures: int) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        upstream = urlsplit(target)
        state = {"left": failures, "failed": 0}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        requests = self.requests
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    requests.append((self.command, self.path, self.headers.get("Range")))
                    fail = matches(self.command, self.path) and state["left"] > 0
                    if fail:
                        state["left"] -= 1
                        state["failed"] += 1
                if fail:
                    error = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError"
                        b"</Code><Message>injected by the test proxy</Message></Error>"
                    )
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = upstream.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                # A HEAD answer has no body but the object's length.
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.state = state
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def failed(self) -> int:
        return self.state["failed"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def assert_secretless(text: str) -> None:
    """Neither test credential appears in `text`."""
    assert SECRET_KEY not in text, "the secret key leaked"
    assert ACCESS_KEY not in text, "the access key id leaked"
