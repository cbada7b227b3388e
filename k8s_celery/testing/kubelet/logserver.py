"""The kubelet's HTTPS endpoint for container logs, which the API server's ``pods/log``
proxies to: ``GET /containerLogs/{namespace}/{pod}/{container}``.

It answers as the kubelet does (``pkg/kubelet/server/server.go``): 404 for a pod or
container it does not know, 400 for a container still waiting to start or a
``previous`` run that does not exist; ``tailLines`` picks the start, ``limitBytes``
cuts the answer (mid-line, as the kubelet does), ``follow`` streams until the run's
process has ended. The output is the container's real output as its process wrote it
(stdout and stderr, in order). Clients authenticate with a certificate of the
cluster CA (the API server's kubelet client certificate), as a kubelet's
``x509.clientCAFile``; every authenticated client may read (``AlwaysAllow``).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from .objects import NODE_IP

if TYPE_CHECKING:
    from .node import ProcessKubelet

log = logging.getLogger(__package__)

PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$")
FOLLOW_POLL = 0.1
#: Options the process kubelet cannot honour: its logs carry no timestamps.
UNSUPPORTED = ("timestamps", "sinceSeconds", "sinceTime")


class LogRequestError(Exception):
    """An answer other than 200, with the kubelet's status code and text."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


class LogServer:
    """Serves the container logs of one :class:`ProcessKubelet` on ``NODE_IP``."""

    def __init__(self, kubelet: ProcessKubelet, ca_cert: Path, cert: Path, key: Path):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca_cert)
        context.verify_mode = ssl.CERT_REQUIRED
        self.kubelet = kubelet
        self.stopping = threading.Event()
        self._server = _TlsServer((NODE_IP, 0), _handler(self), context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="kubelet log server", daemon=True)

    def start(self) -> LogServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def open(self, namespace: str, pod: str, container: str, query: dict[str, str]) -> Iterator[bytes]:
        """The chunks of the answer to one request, or :class:`LogRequestError`."""
        for name in UNSUPPORTED:
            if name in query:
                raise LogRequestError(400, f"{name} is not supported by the process kubelet "
                                           "(its logs carry no timestamps)")
        tail = _number(query, "tailLines")
        limit = _number(query, "limitBytes")
        previous, follow = _flag(query, "previous"), _flag(query, "follow")
        run_dir, running = self.kubelet.container_log(namespace, pod, container, previous)
        return _read(run_dir / "log", tail, limit, follow and running, lambda: self._running(run_dir))

    def _running(self, run_dir: Path) -> bool:
        return not self.stopping.is_set() and self.kubelet.run_is_running(run_dir)


def _read(path: Path, tail: int | None, limit: int | None, follow: bool, running) -> Iterator[bytes]:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:  # the pod was removed meanwhile
        raise LogRequestError(404, "the container's log is gone") from None
    left = limit

    def bounded(chunk: bytes) -> bytes:
        nonlocal left
        if left is not None:
            chunk, left = chunk[:left], left - len(chunk[:left])
        return chunk

    def chunks() -> Iterator[bytes]:
        with handle:
            if tail is not None:
                _seek_tail(handle, tail)
            while left is None or left > 0:
                chunk = handle.read(65536)
                if chunk:
                    yield bounded(chunk)
                    continue
                if not follow:
                    return
                still_running = running()
                chunk = handle.read(65536)  # what it wrote before it ended
                if chunk:
                    yield bounded(chunk)
                elif not still_running:
                    return
                else:
                    time.sleep(FOLLOW_POLL)
    return chunks()


def _seek_tail(handle: BinaryIO, lines: int) -> None:
    """Position ``handle`` at the start of its last ``lines`` lines."""
    starts: deque[int] = deque([0], maxlen=lines + 1)
    for line in iter(handle.readline, b""):
        starts.append(starts[-1] + len(line))
    starts.pop()  # the end of the file starts no line
    handle.seek(starts[0] if starts else handle.tell())


def _number(query: dict[str, str], name: str) -> int | None:
    if name not in query:
        return None
    try:
        value = int(query[name])
    except ValueError:
        raise LogRequestError(400, f"{name}: invalid value {query[name]!r}") from None
    if value < 0 or (name == "limitBytes" and value == 0):
        raise LogRequestError(400, f"{name}: must be greater than {0 if name == 'limitBytes' else -1}")
    return value


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "false").lower() in ("true", "1")


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, context: ssl.SSLContext):
        super().__init__(address, handler)
        self.context = context

    def get_request(self):
        # The handshake runs on the request's thread (finish_request), so that a slow
        # client never holds the accepting thread.
        connection, address = self.socket.accept()
        return self.context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request, client_address) -> None:
        request.settimeout(10)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.debug("kubelet log server: TLS handshake with %s failed: %s", client_address, exc)
            return
        request.settimeout(None)
        super().finish_request(request, client_address)


def _handler(server: LogServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends with the connection: a follow has no length

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            match = PATH.match(url.path)
            if not match:
                self._text(404, "404 page not found")
                return
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            try:
                chunks = server.open(*(unquote(part) for part in match.groups()), query)
                first = next(chunks, b"")
            except LogRequestError as exc:
                self._text(exc.status, str(exc))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            try:
                self.wfile.write(first)
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, socket.timeout, ssl.SSLError):
                pass  # the reader went away (a follow stopped by its client)
            finally:
                chunks.close()

        def _text(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
            log.debug("kubelet log server: " + format, *args)

    return Handler
