"""HTTP core of the loopback Hub: the threaded server, request parsing, the routing table and error answers.

Concern modules (repos, LFS, auth, Jobs) never touch sockets: they register `(method, template, handler)` routes
with `HubServer.add_route` and answer with `Answer` or raise `HubError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from .auth import Token

log = logging.getLogger(__name__)


class HubError(Exception):
    """An HTTP error answer: JSON body `{"error": message}` plus the `X-Error-*` headers the client reads."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra
        self.headers: dict[str, str] = {}


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def redirect(cls, location: str, status: int = 302, headers: Mapping[str, str] | None = None) -> Answer:
        return cls(status, b"", {"Location": location, **(headers or {})})


@dataclass
class Request:
    """One parsed request as a route handler sees it; `params` are the unquoted `{name}` parts of the route."""

    server: HubServer
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    @cached_property
    def token(self) -> Token | None:
        """The bearer token's record, None without one; an unknown bearer token is a 401, as on the Hub."""
        return self.server.token_from_header(self.headers.get("Authorization"))

    @property
    def repo_id(self) -> str:
        return f"{self.params['ns']}/{self.params['name']}"

    def json(self) -> dict[str, Any]:
        try:
            payload = json.loads(self.body or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"body is not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise HubError(400, "body must be a JSON object")
        return payload

    def form(self) -> dict[str, str]:
        """An `application/x-www-form-urlencoded` body (OAuth token requests), last value wins."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8", "replace")).items()}

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")


Handler = Callable[[Request], Answer]


@dataclass
class Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Handler


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int


def compile_template(template: str) -> re.Pattern[str]:
    """`/api/models/{ns}/{name}/tree/{revision}/{sub...}`: `{x}` is one path segment, `{x...}` the rest."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)(\.\.\.)?\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m[1]}>.*)" if m[2] else f"(?P<{m[1]}>[^/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive like the real Hub, so the client's pooled connections are exercised; every answer
    # carries Content-Length and every request body is read in full before answering.
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    timeout = 30  # idle keep-alive sockets are dropped instead of pinning a thread
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        # The request line never holds a token (the client sends it as a header); headers are never logged.
        log.debug("loopback hub: " + format, *args)

    def do_GET(self) -> None:
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_GET


class HubServer:
    """Lifecycle, routing table, request log and failure injection; no Hub semantics of its own."""

    def __init__(self, *, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.auth_log: list[tuple[str, str, str | None]] = []  # (method, path, token's user) of authed requests
        # (method, path, token's display name) of the same requests: tells two tokens of one user apart.
        self.token_log: list[tuple[str, str, str]] = []
        self._lock = threading.RLock()
        self._routes: list[Route] = []
        self._failures: list[_Failure] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def add_route(self, method: str, template: str, handler: Handler) -> None:
        """Register a handler; routes are tried in registration order and the first match answers."""
        self._routes.append(Route(method.upper(), template, compile_template(template), handler))

    def token_from_header(self, authorization: str | None) -> Token | None:
        raise NotImplementedError  # supplied by the auth concern

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running: call start() or use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="loopback-hub",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Keep-alive connections would otherwise outlive the server and keep answering a pooled client.
        with server.connections_lock:
            open_connections = list(server.connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fail_next(self, method: str, path_regex: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` requests whose method and path match with `status` (to test retries)."""
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, times))

    # ------------------------------------------------------------------ plumbing

    def _handle(self, raw: _Handler) -> None:
        method = raw.command
        split = urlsplit(raw.path)
        self.requests.append((method, split.path))
        try:
            body = self._read_body(raw)
            request = Request(self, method, split.path, parse_qs(split.query), raw.headers, body)
            answer = self._maybe_fail(method, split.path) or self._dispatch(request)
        except HubError as exc:
            answer = Answer.json({"error": exc.message, **exc.extra}, exc.status, exc.headers)
            # ASCII only: header values go out as latin-1 and the client reads the message from here first.
            answer.headers["X-Error-Message"] = exc.message.encode("ascii", "replace").decode()
            if exc.code:
                answer.headers["X-Error-Code"] = exc.code
        except Exception:  # a bug in this test server must show up as a 500, never as a hung client
            log.exception("loopback hub: unhandled error on %s %s", method, split.path)
            answer = Answer.json({"error": "internal error in the loopback hub"}, 500)
        self._send(raw, answer, head=method == "HEAD")

    def _dispatch(self, request: Request) -> Answer:
        for route in self._routes:
            if route.method != request.method and not (route.method == "GET" and request.method == "HEAD"):
                continue
            match = route.pattern.match(request.path)
            if match:
                request.params = {k: unquote(v) for k, v in match.groupdict().items()}
                with self._lock:
                    answer = route.handler(request)
                    token = request.__dict__.get("token")  # only if the handler looked at it
                    if token is not None:
                        self.auth_log.append((request.method, request.path, token.user))
                        self.token_log.append((request.method, request.path, token.display_name))
                return answer
        raise HubError(404, f"no route for {request.method} {request.path}")

    def _read_body(self, req: _Handler) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(req.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > self.max_body_bytes:
                    req.close_connection = True
                    raise HubError(413, "request body too large for the loopback hub")
                chunks.append(req.rfile.read(size))
                req.rfile.readline()
            return b"".join(chunks)
        length = int(req.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes:
            req.close_connection = True  # the unread body would desynchronise the keep-alive stream
            raise HubError(413, "request body too large for the loopback hub")
        return req.rfile.read(length) if length else b""

    def _maybe_fail(self, method: str, path: str) -> Answer | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and failure.method == method and failure.pattern.search(path):
                    failure.remaining -= 1
                    return Answer.json({"error": f"injected failure {failure.status}"}, failure.status)
        return None

    def _send(self, req: _Handler, answer: Answer, *, head: bool) -> None:
        req.send_response(answer.status)
        headers = {"Content-Length": str(len(answer.body)), **answer.headers}
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        if not head and answer.body:
            req.wfile.write(answer.body)
