"""The configuration: defaults, the shipped example, and errors that name the wrong key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plugin.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_no_file_gives_embedded_defaults() -> None:
    config = load_config(None)
    assert config.dicom.ae_title == "RADGATE"
    assert config.dicom.port == 11112
    assert config.completion.quiet_period_s == 10.0
    assert config.db_url.startswith("sqlite:///")


def test_example_file_loads() -> None:
    config = load_config(REPO / "radgate.example.yaml")
    assert isinstance(config, Config)
    assert config.dicom == Config().dicom


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dicom:\n  prot: 104\n", "dicom.prot: unknown key"),
        ("dicom:\n  port: 70000\n", "dicom.port"),
        ("dicom:\n  ae_title: THIS_AE_TITLE_IS_TOO_LONG\n", "dicom.ae_title"),
        ("dicom:\n  allowed_peers:\n    - address: 10.0.0.300\n", "dicom.allowed_peers.0.address"),
        ("completion:\n  quiet_period_s: -1\n", "completion.quiet_period_s"),
        ("dicom:\n  tls:\n    enabled: true\n", "dicom.tls"),
        ("- just\n- a list\n", "must be a mapping"),
        ("dicom: [unclosed\n", "not valid YAML"),
    ],
)
def test_wrong_key_or_value_names_it(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "radgate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value)


def test_command_line_overrides_are_validated() -> None:
    config = load_config(None).with_overrides(**{"dicom.port": 104, "dicom.ae_title": "NODE2"})
    assert (config.dicom.port, config.dicom.ae_title) == (104, "NODE2")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_config(None).with_overrides(**{"dicom.port": 0})


def test_allowed_peer_matching() -> None:
    config = Config.model_validate(
        {
            "dicom": {
                "allowed_peers": [{"ae_title": "PACS", "address": "10.1.0.0/16"}, {"address": "127.0.0.1"}]
            }
        }
    )
    pacs, local = config.dicom.allowed_peers
    assert pacs.admits("PACS", "10.1.2.3")
    assert not pacs.admits("PACS", "10.2.0.1")
    assert not pacs.admits("OTHER", "10.1.2.3")
    assert local.admits("ANY", "127.0.0.1")


def test_cli_reports_config_error_and_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  prot: 104\n")
    proc = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "studies", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "dicom.prot: unknown key" in proc.stderr
