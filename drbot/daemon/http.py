"""The daemon's one HTTP port: /healthz, /readyz and /metrics.

/healthz answers 200 while the process and its scheduler live (a liveness probe: restart me
if not). /readyz answers 200 only when policies are loaded, every destination answered its
last check and every streamer this daemon runs is connected, else 503 with the reasons as
JSON (a readiness probe, and the first thing to look at when something is off).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from drbot.errors import UsageError

log = structlog.get_logger(__name__)

Probe = Callable[[], tuple[bool, dict[str, Any]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit these every few seconds; access lines would drown the job summaries.
        return


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') as a pair; UsageError naming the setting otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(
            f"DRBOT_HTTP must be host:port (e.g. 127.0.0.1:9187), not {text!r}",
        )
    return host, int(port)


class HealthServer:
    """Serves the three endpoints from a thread; `stop()` closes the port."""

    def __init__(
        self, address: str, registry: CollectorRegistry, *, live: Probe, ready: Probe
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._live = live
        self._ready = ready
        host, port = parse_address(address)
        try:
            self._server = make_server(
                host, port, self._app, server_class=_Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {address} for /healthz and /metrics: {exc.strerror or exc}",
                hint="set DRBOT_HTTP to a free host:port",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="drbot-http", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("daemon.http_listening", address=self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics(environ, start_response)
            return body
        if path in ("/healthz", "/readyz"):
            try:
                ok, details = (self._live if path == "/healthz" else self._ready)()
            except Exception as exc:  # a probe must answer, never hang up
                ok, details = False, {"error": f"{exc.__class__.__name__}: {exc}"}
            payload = json.dumps({"ok": ok, **details}, default=str).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
            )
            return [payload]
        payload = b"drbot: /healthz /readyz /metrics\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(payload)))],
        )
        return [payload]
