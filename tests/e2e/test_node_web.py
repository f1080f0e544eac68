"""`radgate serve` with its web console, and `radgate web` alone: real processes, real ports."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
from support.node import RADGATE, NodeProcess, wait_for

from plugin.store.engine import Store
from plugin.web import audit

URL = re.compile(r"web console: (http://127\.0\.0\.1:\d+)/")


def test_serve_logs_the_console_url_and_records_its_configuration(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {"web": {}}).start()
    try:
        url = wait_for(lambda: URL.search(node.log()), 30, "the console URL in the log").group(1)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/api/me").status_code == 401
        assert node.echoscu().returncode == 0  # DICOM beside it
    finally:
        assert node.stop() == 0
    store = Store(f"sqlite:///{node.data_dir / 'radgate.db'}")
    try:
        [loaded] = [e for e in audit.events(store, studies=False) if e.action == "config.loaded"]
    finally:
        store.dispose()
    assert loaded.target == "serve" and loaded.detail is not None
    assert re.fullmatch(r"[0-9a-f]{64}", str(loaded.detail["sha256"]))


def test_serve_stops_with_a_clear_message_when_the_console_port_is_taken(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        node = NodeProcess(tmp_path, {"web": {"port": port}})
        done = subprocess.run(
            [str(RADGATE), "serve", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"web console cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "radgate serving" not in done.stderr


def test_radgate_web_serves_the_console_alone_and_stops_on_sigterm(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {"web": {}})  # its configuration; no `radgate serve` runs
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        web = subprocess.Popen(
            [str(RADGATE), "web", "--config", str(node.config_path)], stdout=out, stderr=out
        )
    try:
        url = wait_for(lambda: URL.search(log.read_text()), 30, "the console URL in the log").group(1)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/login").status_code == 200
        assert "radgate users add NAME --role admin" in httpx.get(f"{url}/login").text  # no user yet
    finally:
        web.send_signal(signal.SIGTERM)
        assert web.wait(20) == 0
    assert "web console stopped" in log.read_text()
