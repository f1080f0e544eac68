"""DICOM TLS from the configuration: a TLS peer stores, a plain-TCP peer gets nowhere."""

from __future__ import annotations

from pathlib import Path

from support.node import NodeProcess, self_signed_cert, wait_for, write_series


def test_tls_peers_store_and_plain_peers_do_not(tmp_path: Path) -> None:
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    self_signed_cert(key, cert, "/CN=127.0.0.1")
    tls = {"enabled": True, "cert_file": str(cert), "key_file": str(key)}
    node = NodeProcess(tmp_path / "node", {"dicom": {"tls": tls}}).start()
    try:
        files = write_series(tmp_path / "src", 3)
        plain = node.storescu(*files)
        assert "Success" not in plain.stderr, plain.stderr
        secure = node.storescu(*files, options=("+tla", "+cf", str(cert)))
        assert secure.returncode == 0 and secure.stderr.count("Success") == 3, secure.stderr
        wait_for(
            lambda: [s for s in node.studies(cli=False) if s["state"] == "COMPLETE"],
            30,
            "the study to complete",
            interval=0.2,
        )
        assert node.studies(cli=False)[0]["instance_count"] == 3
    finally:
        assert node.stop() == 0, node.log()
