"""The transport uses pynetdicom's internals, so it runs only on the release it was written against."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pynetdicom
import pytest

from dicom_io.net import _pynetdicom

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_another_pynetdicom_is_refused_with_both_versions_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(ImportError) as raised:
        _pynetdicom.check_pynetdicom_version()
    message = str(raised.value)
    assert "pynetdicom 3.1.0 is installed" in message
    assert f"written against pynetdicom {_pynetdicom.PYNETDICOM_VERSION}" in message
    assert f"pynetdicom=={_pynetdicom.PYNETDICOM_VERSION}" in message  # what to do


def test_the_release_written_against_passes_the_check() -> None:
    assert pynetdicom.__version__ == _pynetdicom.PYNETDICOM_VERSION
    _pynetdicom.check_pynetdicom_version()


def test_pyproject_pins_that_release_exactly() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert f"pynetdicom=={_pynetdicom.PYNETDICOM_VERSION}" in dependencies
