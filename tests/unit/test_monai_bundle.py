"""monai-bundle with a real bundle directory the test builds: a tiny network whose weights threshold HU.

The network (two 1x1x1 convolution channels: background = 200 - HU, bone = HU - 200) makes the
argmax exactly "HU > 200", which on the chest phantom is exactly its bone truth, so any shift, flip
or transpose between the bundle's (x, y, z) RAS world and the Volume's (z, y, x) grid shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from support.pipeline import (
    BONE,
    flip_mask,
    flipped,
    phantom_volume,
    write_threshold_bundle,
)

from ai_models import PipelineError, get_pipeline, run_pipeline
from dicom_io.labels import LabelSpec, load_label_table
from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom
from dicom_io.types import Code

if TYPE_CHECKING:
    from ai_models.monai_bundle import MonaiBundlePipeline

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")  # tests/conftest.py


def _bundle_pipeline(bundle_dir: Path, **options: Any) -> MonaiBundlePipeline:
    """A MonaiBundlePipeline, its module imported here: importing MONAI costs seconds of CPU, which
    every test process would pay when it collects this module."""
    from ai_models.monai_bundle import MonaiBundlePipeline

    return MonaiBundlePipeline(bundle_dir, **options)


@pytest.fixture(scope="module")
def phantom() -> SyntheticSeries:
    return ct_chest_phantom(rows=64, columns=64, slices=30, seed=11)


def test_bundle_output_is_the_bone_truth_on_the_volume_grid(phantom: SyntheticSeries, tmp_path: Path) -> None:
    pipeline = get_pipeline("monai-bundle", bundle_dir=write_threshold_bundle(tmp_path / "b", resample=False))
    assert (pipeline.name, pipeline.version) == ("monai-bundle:bone_threshold", "0.1.0")
    volume = phantom_volume(phantom)
    import torch

    findings = run_pipeline(pipeline, volume, torch.device("cpu"))
    [bone] = findings.segments
    assert (bone.number, bone.label, bone.property_type.value) == (1, "Bone", "272673000")
    assert np.array_equal(bone.mask, phantom.truth["bone"])
    [volume_ml] = findings.measurements
    assert volume_ml.value == pytest.approx(phantom.truth_ml("bone"))
    assert (volume_ml.unit.value, volume_ml.segment) == ("cm3", 1)


@pytest.mark.parametrize("axis", [0, 2])
def test_bundle_with_resampling_is_inverted_back_to_the_grid(
    phantom: SyntheticSeries, tmp_path: Path, axis: int
) -> None:
    """Orientationd + Spacingd on the way in, Invertd on the way out: the mask lands where the bone is."""
    pipeline = _bundle_pipeline(write_threshold_bundle(tmp_path / "b", resample=True))
    volume = flipped(phantom_volume(phantom), axis)
    truth = flip_mask(phantom.truth["bone"], axis)
    import torch

    [bone] = run_pipeline(pipeline, volume, torch.device("cpu")).segments
    dice = 2.0 * float((bone.mask & truth).sum()) / float(bone.mask.sum() + truth.sum())
    assert dice > 0.85  # resampled twice at about half the voxel size: edges move, places do not


def test_label_table_from_argument_and_errors(tmp_path: Path, phantom: SyntheticSeries) -> None:
    bundle = write_threshold_bundle(tmp_path / "b", resample=False, labels=False)
    with pytest.raises(FileNotFoundError):
        _bundle_pipeline(bundle)
    custom = {
        1: LabelSpec("Dense", Code("123037004", "SCT", "Anatomical Structure"), Code("1", "99X", "Dense"))
    }
    pipeline = _bundle_pipeline(bundle, labels=custom)
    assert pipeline.labels[1].label == "Dense"
    table = tmp_path / "labels.json"
    table.write_text(json.dumps(BONE))
    assert load_label_table(table)[1].label == "Bone"
    with pytest.raises(ValueError, match=">= 1"):
        load_label_table({0: BONE["1"]})
    with pytest.raises(FileNotFoundError, match="not a MONAI bundle"):
        _bundle_pipeline(tmp_path)
    import torch

    mr = phantom_volume(phantom, Modality="MR")
    with pytest.raises(PipelineError, match="needs CT"):
        run_pipeline(pipeline, mr, torch.device("cpu"))
