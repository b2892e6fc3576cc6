"""Small real HTTP servers on 127.0.0.1 whose answers a test scripts (slow, broken, hostile FHIR servers).

    with ScriptedServer(lambda request: request.send_json(200, {...})) as server:
        server.base_url        # http://127.0.0.1:<port>/fhir
        server.requests        # [RecordedRequest(path, headers)] in arrival order
        server.max_concurrent  # most requests handled at the same time

The `respond` callback gets the live handler (`ScriptedHandler`): `path`, `headers`, the `send_*`
helpers, and `server.release` (an Event set on close, so a handler that waits on it ends promptly).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WideBacklogServer(ThreadingHTTPServer):
    # The hook opens ~9 connections at once; socketserver's default backlog of 5 makes the kernel
    # drop some, which retry after 1 s and look like FHIR timeouts.
    request_queue_size = 128


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    client_port: int


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable
    disable_nagle_algorithm = True  # else delayed ACKs add 40 ms to every small answer
    scripted: ScriptedServer  # set on the subclass each server makes

    def do_GET(self):  # noqa: N802
        self.scripted.enter(self)
        try:
            self.scripted.respond(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (deadline): that is what some tests want
        finally:
            self.scripted.leave()

    def send_json(self, status: int, body: object, content_type: str = "application/fhir+json") -> None:
        self.send_bytes(status, json.dumps(body).encode(), content_type)

    def send_bytes(self, status: int, body: bytes, content_type: str = "application/fhir+json",
                   headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ScriptedServer:
    def __init__(self, respond: Callable[[ScriptedHandler], None]):
        self.respond = respond
        self.requests: list[RecordedRequest] = []
        self.release = threading.Event()
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()
        handler = type("Handler", (ScriptedHandler,), {"scripted": self})
        self.httpd = WideBacklogServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.handle_error = lambda request, address: None  # clients that hang up are expected
        self.origin = f"http://127.0.0.1:{self.httpd.server_port}"
        self.base_url = f"{self.origin}/fhir"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def enter(self, handler: ScriptedHandler) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(handler.path, dict(handler.headers), handler.client_address[1]))
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
