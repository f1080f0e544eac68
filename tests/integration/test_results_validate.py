"""dicom_io.testing.validate: the wrappers report failures (with the tool's lines) and never pass silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.results import require, viewercheck_tool
from support.testdata import TESTDATA, needs_testdata

from dicom_io.testing import validate

DCMQI = TESTDATA / "dcmqi"


def test_missing_tool_did_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    for result in (validate.dciodvfy(DCMQI / "segmentations/liver.dcm"), validate.pixelmed_sr(Path("x"))):
        assert not result.ran and not result.ok
        assert "not installed" in result.errors[0]
        assert "did not run" in str(result)


def test_pixelmed_without_completion_line_is_not_a_pass(tmp_path: Path) -> None:
    """A file pixelmed cannot read prints no `IOD validation complete`: reported as not run."""
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = validate.pixelmed_sr(junk)
    if result.errors and "not installed" in result.errors[0]:
        pytest.skip("DicomSRValidator is not installed")
    assert not result.ran and not result.ok


@needs_testdata
def test_dciodvfy_reports_error_lines(tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(DCMQI / "segmentations/liver.dcm")
    del ds.StudyInstanceUID
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    result = require(validate.dciodvfy(broken))
    assert not result.ok
    assert any("StudyInstanceUID" in line for line in result.errors)


@needs_testdata
def test_viewercheck_reports_dcmqi_sr_without_coordinates() -> None:
    """dcmqi's SR has no coordinates: OHIF's loader throws, and the wrapper says so with FAIL lines.

    viewercheck_many, in one Node process, gives each job what its own run gives: the same lines for
    the failing pair, then a pass for the SEG alone.
    """
    tool = viewercheck_tool()
    seg, sr, source = (
        DCMQI / "segmentations/liver.dcm",
        DCMQI / "sr-example/sr.dcm",
        DCMQI / "segmentations/ct-3slice",
    )
    result = require(validate.viewercheck(tool, seg, sr, source))
    assert not result.ok
    assert any(line.startswith("FAIL sr.geometry") for line in result.errors)
    assert not any(line.startswith("FAIL seg.") for line in result.errors)
    failing, passing = validate.viewercheck_many(tool, [(seg, sr, source), (seg, None, source)])
    assert require(failing).output == result.output and not failing.ok
    assert require(passing).ok, passing.output
    assert not any(line.startswith("FAIL") for line in passing.output.splitlines())
