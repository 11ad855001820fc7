"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, from a daemon thread.

* ``/metrics``: :data:`zeroloss.metrics.REGISTRY` in the Prometheus text format.
* ``/healthz``: 200 while the process runs (a liveness probe: restart it when this fails).
* ``/readyz``: 200 when the caller's ``ready()`` says so, else 503 with the reason — for the
  relay, the outbox store answered its last iteration and the broker is not in an outage.

An application that writes to the outbox can serve the same registry (``zeroloss_outbox_added``
counts its adds)::

    server = HealthServer(9100).start()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from zeroloss import metrics
from zeroloss.errors import ConfigError

Ready = Callable[[], tuple[bool, str]]
StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood stderr


class HealthServer:
    """Serve the endpoints on ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "0.0.0.0",
        ready: Ready | None = None,
        registry: CollectorRegistry = metrics.REGISTRY,
    ) -> None:
        self.host = host
        self._port = port
        self._ready = ready or (lambda: (True, "ok"))
        self._metrics_app = make_wsgi_app(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port if self._server is None else int(self._server.server_port)

    def start(self) -> HealthServer:
        try:
            self._server = make_server(
                self.host, self._port, self._app, server_class=_Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.host}:{self._port}: {exc}; pick another port") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="zeroloss-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            try:
                ok, why = self._ready()
            except Exception as exc:  # a readiness check that breaks means: not ready
                ok, why = False, f"readiness check failed: {exc}"
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", why)
        return _text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz")


def _text(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
