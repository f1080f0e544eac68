"""An ASGI app served by uvicorn in a daemon thread of this process: the console beside the node
(`plugin.web.app.WebServer`) and the demo's OHIF viewer (`plugin.demo.viewer.ViewerServer`)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Literal

import uvicorn


class ThreadedServer:
    """``app`` on ``host:port`` (port 0: a free one), bound at construction (OSError when it cannot be)."""

    def __init__(
        self, app: Any, host: str, port: int, name: str, lifespan: Literal["on", "off"] = "off"
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan=lifespan)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=name, daemon=True
        )

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    def start(self, timeout: float) -> None:
        """Serve; returns once uvicorn is serving. TimeoutError, with everything stopped, when it is
        not serving within ``timeout`` s (or its thread ended)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self._thread.name} did not start on {self.url}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (open requests get up to 10 s) and close the socket; safe to call twice."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()
