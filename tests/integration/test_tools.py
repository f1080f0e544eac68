"""The external-tool helpers: clear errors when a tool is missing, and faithful results when present."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_io.testing import tools
from dicom_io.testing.synthetic import SyntheticSeries
from dicom_io.testing.tools import ToolNotFoundError, free_port

MISSING: dict[str, Callable[[], object]] = {
    "storescu": lambda: tools.storescu("127.0.0.1", 1, "X", ["/nonexistent"]),
    "echoscu": lambda: tools.echoscu("127.0.0.1", 1, "X"),
    "findscu": lambda: tools.findscu("127.0.0.1", 1, "X", {"StudyInstanceUID": ""}),
    "dciodvfy": lambda: tools.dciodvfy("/nonexistent.dcm"),
    "dcm2niix": lambda: tools.dcm2niix("/nonexistent"),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_tool_raises_a_clear_error(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADGATE_TOOL_PATH", str(tmp_path))
    with pytest.raises(ToolNotFoundError, match=rf"{name} not found.*Debian package"):
        MISSING[name]()


def test_tools_come_from_the_system_not_the_virtualenv() -> None:
    for name in ("storescu", "echoscu", "findscu"):
        assert ".venv" not in tools.tool_path(name)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1024 <= port <= 65535


def test_dciodvfy_reports_errors_of_a_broken_file(ct_phantom_dir: Path, tmp_path: Path) -> None:
    good = sorted(ct_phantom_dir.glob("*.dcm"))[0]
    assert tools.dciodvfy(good).ok
    ds = pydicom.dcmread(good)
    del ds.ImagePositionPatient  # type 1 in the Image Plane module
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    result = tools.dciodvfy(broken)
    assert not result.ok and any("ImagePositionPatient" in line for line in result.errors), result.output


def test_storescu_to_a_closed_port_fails_cleanly(ct_phantom_dir: Path) -> None:
    result = tools.storescu("127.0.0.1", free_port(), "NOBODY", [ct_phantom_dir], extra_args=["-to", "5"])
    assert not result.ok and not result.all_succeeded
    assert "Association Request Failed" in result.output or "connection refused" in result.output.lower()


def test_dcm2niix_agrees_with_the_phantom(
    ct_phantom: SyntheticSeries, ct_phantom_dir: Path, tmp_path: Path
) -> None:
    nifti = nib.Nifti1Image.from_filename(tools.dcm2niix(ct_phantom_dir, tmp_path))
    assert nifti.shape == ct_phantom.voxels.shape[::-1]
    data = np.asarray(nifti.dataobj)  # applies scl_slope/scl_inter: HU
    # NIfTI world is RAS, the phantom's LPS: flip x and y, then find each phantom voxel in the NIfTI
    to_nifti = np.linalg.solve(nifti.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct_phantom.affine)
    for k, i, j in [(0, 0, 0), (5, 20, 10), (20, 48, 48), (39, 95, 60)]:
        index = to_nifti @ [j, i, k, 1.0]
        assert np.allclose(index, np.rint(index), atol=1e-3)
        assert data[tuple(np.rint(index[:3]).astype(int))] == ct_phantom.voxels[k, i, j]
