"""totalsegmentator end to end with fake weights in TotalSegmentator's layout: DICOM in, SEG and SR out.

The weights are the band model (tests/support/totalseg_weights.py) as TotalSegmentator's 3 mm
model: label k of task total for HU in band k. The series is oblique at 3 mm, so nothing is
resampled and each source voxel's label is known exactly; TotalSegmentator itself (its python
API, its nnU-Net run in worker processes) does the rest, with every name lookup and connection
refused and recorded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from support.nnunet_model import expected_labels
from support.results import check_frames_on_sources, check_masks, make_series, require
from support.totalseg_weights import BANDS, band, place_weights

from ai_models.base import VOLUME
from ai_models.totalseg_catalog import label_table
from dicom_io.testing import validate
from dicom_io.types import Findings, Volume
from dicom_io.volume import load_series
from plugin.config import load_config
from plugin.offline.run import DICOM_DIR, run_offline

pytestmark = pytest.mark.slow

SPLEEN, LEFT_KIDNEY, LEFT_KIDNEY_CYST = 1, 3, 23


def _voxels(shape: tuple[int, int, int]) -> np.ndarray:
    voxels = np.full(shape, -1000, np.int16)  # air: background
    voxels[2:6, 3:10, 4:12] = band(SPLEEN)
    voxels[6:10, 10:18, 4:12] = band(LEFT_KIDNEY)
    voxels[3:9, 5:15, 14:20] = band(LEFT_KIDNEY_CYST)
    return voxels


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of a configured totalsegmentator (fast) on an oblique 3 mm series, through `radgate run`."""
    root = tmp_path_factory.mktemp("totalseg")
    series = make_series("oblique", shape=(12, 20, 24), spacing=(3.0, 3.0), slice_step=3.0)
    voxels = _voxels(series.volume.shape)
    slice_of = {ref.sop_instance_uid: k for k, ref in enumerate(series.volume.sources)}
    (root / "in").mkdir()
    for ds in series.datasets:
        ds.PixelData = voxels[slice_of[ds.SOPInstanceUID]].tobytes()
        ds.save_as(root / "in" / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    config_file = root / "radgate.yaml"
    settings = {"kind": "totalsegmentator", "weights_dir": str(place_weights(root / "weights")), "fast": True}
    config_file.write_text(yaml.safe_dump({"pipelines": {"organs": settings}}))
    kind, options = load_config(config_file).pipeline_options("organs")

    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(repr(args[:2]))
        raise OSError("no network in this test")

    forks: list[str] = []  # where this process forked while the run went on
    during_run = threading.Event()

    def record_fork() -> None:
        if during_run.is_set():
            forks.append("".join(traceback.format_stack()))

    os.register_at_fork(before=record_fork)

    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket, "create_connection", refuse)
        during_run.set()
        try:
            findings = run_offline(
                kind, root / "in", root / "out", options=options, device=torch.device("cpu"), progress=False
            )
        finally:
            during_run.clear()
    volume = load_series(sorted((root / "in").iterdir()))
    return {
        **{"root": root, "findings": findings, "volume": volume, "datasets": series.datasets},
        **{"calls": calls, "forks": forks},
    }


def test_labels_land_on_the_source_voxels_they_belong_to(run: dict[str, Any]) -> None:
    findings: Findings = run["findings"]
    volume: Volume = run["volume"]
    assert (findings.pipeline, findings.version) == ("totalsegmentator", "2.18.0-total_fast")
    assert [s.number for s in findings.segments] == list(range(1, 118))
    expected = expected_labels(volume.voxels, BANDS)
    assert set(np.unique(expected)) == {0, SPLEEN, LEFT_KIDNEY, LEFT_KIDNEY_CYST}
    for segment in findings.segments:
        assert np.array_equal(segment.mask, expected == segment.number), segment.label
    volumes = {m.segment: m.value for m in findings.measurements if m.value > 0}
    voxel_ml = volume.voxel_volume_ml
    assert volumes == pytest.approx({k: float((expected == k).sum()) * voxel_ml for k in volumes})
    assert set(volumes) == {SPLEEN, LEFT_KIDNEY, LEFT_KIDNEY_CYST}


def test_nothing_was_fetched_or_sent(run: dict[str, Any]) -> None:
    assert run["calls"] == []


def test_the_run_forks_no_process(run: dict[str, Any]) -> None:
    """A fork of a process that runs other threads (a Ray actor's gRPC threads) can hang the child,
    and then nnU-Net's process pool waits for it forever: its processes are started otherwise."""
    assert run["forks"] == [], run["forks"][0]


def _files(run: dict[str, Any], kind: str) -> list[Path]:
    return sorted((run["root"] / "out" / DICOM_DIR).glob(f"{kind}-*.dcm"))


def test_the_seg_holds_the_present_structures_coded_and_on_the_source_frames(run: dict[str, Any]) -> None:
    [seg_path] = _files(run, "SEG")
    result = require(validate.dciodvfy(seg_path))
    assert result.ok, str(result)
    check_masks(seg_path, run["findings"], run["volume"])
    seg = pydicom.dcmread(seg_path)
    check_frames_on_sources(seg, run["datasets"])
    table = label_table()
    items = {str(item.SegmentLabel): item for item in seg.SegmentSequence}
    assert sorted(items) == ["kidney_cyst_left", "kidney_left", "spleen"]

    def code(item: Any) -> tuple[str, str, str]:
        return (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))

    for value in (SPLEEN, LEFT_KIDNEY, LEFT_KIDNEY_CYST):
        spec, item = table[value], items[table[value].label]
        assert code(item.SegmentedPropertyCategoryCodeSequence[0]) == (
            spec.category.value,
            spec.category.scheme,
            spec.category.meaning,
        )
        property_type = item.SegmentedPropertyTypeCodeSequence[0]
        assert code(property_type)[0] == spec.property_type.value
        modifiers = property_type.get("SegmentedPropertyTypeModifierCodeSequence")
        regions = item.get("AnatomicRegionSequence")
        if value == SPLEEN:
            assert modifiers is None and regions is None
        elif value == LEFT_KIDNEY:  # laterality on the type
            assert [code(m) for m in modifiers] == [("7771000", "SCT", "Left")] and regions is None
        else:  # a cyst (type) in the kidney (region), left (the region's modifier)
            assert modifiers is None and code(regions[0]) == ("64033007", "SCT", "Kidney")
            assert [code(m) for m in regions[0].AnatomicRegionModifierSequence] == [
                ("7771000", "SCT", "Left")
            ]


def test_the_sr_is_valid_and_reports_the_volumes(run: dict[str, Any]) -> None:
    [sr_path] = _files(run, "SR")
    result = require(validate.dciodvfy(sr_path))
    assert result.ok, str(result)
    texts, volumes = [], []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                texts.append(str(item.TextValue))
            elif item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == VOLUME.value:
                volumes.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(sr_path).ContentSequence)
    expected = {round(m.value, 3) for m in run["findings"].measurements if m.value > 0}
    assert len(expected) == 3 and {round(v, 3) for v in volumes} == expected
    assert "No kidney_right found" in texts and "No spleen found" not in texts


def test_trainers_are_imported_from_their_own_module(run: dict[str, Any]) -> None:
    """After the run (which needed both of the fast mode's): the 1.5 mm models' trainer too."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from ai_models.totalsegmentator import trainer_class

    for name in ("nnUNetTrainer_4000epochs_NoMirroring", "nnUNetTrainerNoMirroring"):
        found = trainer_class(name)
        assert found.__name__ == name and issubclass(found, nnUNetTrainer)


CONFIG_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
from plugin.config import load_config
config = load_config(Path(sys.argv[1]))
print(json.dumps({"kind": config.pipeline_options("organs")[0],
                  "imported": sorted(m for m in ("torch", "nnunetv2", "totalsegmentator.python_api")
                                     if m in sys.modules)}))
"""


def test_the_start_check_imports_no_torch(run: dict[str, Any]) -> None:
    """In a fresh process, as the node's main process loads its configuration."""
    done = subprocess.run(
        [sys.executable, "-c", CONFIG_WITHOUT_TORCH, str(run["root"] / "radgate.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == {"kind": "totalsegmentator", "imported": []}
