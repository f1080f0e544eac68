"""nnunet from the configuration to SEG and SR: what a worker does with a routed job, in this process.

The model is the tests' hand-weighted nnU-Net (tests/support/nnunet_model.py): label k where the
intensity is in band k, so the exact masks are known. The series are stored sagittally and
obliquely, with instance numbers running against the slice normal and the files shuffled, so a
frame on any plane but its own source's, or a swapped side, shows; dciodvfy checks SEG and SR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.nnunet_model import band_labels, band_phantom, expected_labels, write_band_model
from support.results import Series, check_frames_on_sources, make_series, require

from dicom_io.results.reading import sr_measurements
from dicom_io.testing import validate
from dicom_io.types import Volume
from plugin.config import Config
from plugin.jobs.executor import Task
from plugin.jobs.executor.work import run_task

pytestmark = pytest.mark.slow

THRESHOLDS = (-400.0, 200.0, 800.0)
VOXEL_ML = 0.008  # 2 mm isotropic: the plans' spacing, so nnU-Net resamples nothing and masks are exact


def _band_series(orientation: str) -> Series:
    """A shuffled CT series of the band phantom, its Volume as the node loads it (ascending normal)."""
    series = make_series(orientation, shape=(8, 20, 16), spacing=(2.0, 2.0), slice_step=2.0)
    voxels = band_phantom(series.volume.shape, THRESHOLDS)
    plane = {ref.sop_instance_uid: k for k, ref in enumerate(series.volume.sources)}
    for ds in series.datasets:
        ds.PixelData = voxels[plane[str(ds.SOPInstanceUID)]].tobytes()
    volume = series.volume
    return Series(series.datasets, Volume(voxels, volume.affine, volume.sources, dict(volume.attributes)))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model") / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    return write_band_model(root, THRESHOLDS, labels_file=False)


@pytest.fixture(scope="module", params=["sagittal", "oblique"])
def results(
    request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Series, dict[str, Path]]:
    """The job's result files by modality, after the configured pipeline ran on the series' files."""
    config = Config.model_validate(
        {
            "pipelines": {
                "bands": {
                    "kind": "nnunet",
                    "model_dir": str(model),
                    "labels": {int(k): v for k, v in band_labels(THRESHOLDS).items()},
                    "use_mirroring": False,
                    "device": "cpu",
                }
            }
        }
    )
    base, options = config.pipeline_options("bands")
    series = _band_series(request.param)
    folder = tmp_path_factory.mktemp("series")
    files = []
    for k, ds in enumerate(series.datasets):
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        files.append(str(folder / f"{k}.dcm"))
    source = series.datasets[0]
    task = Task(
        1, "bands", str(source.StudyInstanceUID), str(source.SeriesInstanceUID), 1, tuple(files),
        str(tmp_path_factory.mktemp("out") / "1"), base=base, options=options,
    )  # fmt: skip
    import torch

    outcome = run_task(task, torch.device("cpu"), {}, lambda *_: None)
    assert outcome.error is None, outcome.error
    by_modality = {
        str(pydicom.dcmread(path, stop_before_pixels=True).Modality): Path(path)
        for _, path in outcome.results
    }
    return series, by_modality


def test_seg_and_sr_pass_dciodvfy(results: tuple[Series, dict[str, Path]]) -> None:
    _, files = results
    for modality in ("SEG", "SR"):
        outcome = require(validate.dciodvfy(files[modality]))
        assert outcome.ok, f"{modality}: {outcome}"


def test_seg_frames_hold_exactly_the_bands_of_their_source_images(
    results: tuple[Series, dict[str, Path]],
) -> None:
    series, files = results
    check_frames_on_sources(pydicom.dcmread(files["SEG"]), series.datasets)
    import highdicom as hd

    seg = hd.seg.segread(files["SEG"])
    uids = [ref.sop_instance_uid for ref in series.volume.sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=None)
    truth = expected_labels(series.volume.voxels, THRESHOLDS)
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    assert labels == ["Band one", "Band two", "Band three"]
    for index, item in enumerate(seg.SegmentSequence):
        expected = truth == int(item.SegmentNumber)
        assert expected.any()
        np.testing.assert_array_equal(pixels[..., index].astype(bool), expected, err_msg=labels[index])
        assert (
            item.SegmentedPropertyTypeCodeSequence[0].CodeValue
            == band_labels(THRESHOLDS)[str(index + 1)]["type"][0]
        )


def test_sr_has_each_segments_volume(results: tuple[Series, dict[str, Path]]) -> None:
    series, files = results
    truth = expected_labels(series.volume.voxels, THRESHOLDS)
    volumes = {
        group: value
        for group, label, value, unit in sr_measurements(pydicom.dcmread(files["SR"]))
        if label == "volume"
    }
    for k, name in enumerate(("Band one", "Band two", "Band three"), start=1):
        assert volumes[name] == pytest.approx(float((truth == k).sum()) * VOXEL_ML, rel=1e-3), name
