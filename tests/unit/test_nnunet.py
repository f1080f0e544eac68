"""nnunet with a real nnU-Net v2 model folder the tests build: a network that labels HU bands.

The model (tests/support/nnunet_model.py) labels each voxel by its intensity band, so the exact label
map is known; the phantom's bands sit in blocks that no flip or axis swap maps onto themselves, so
a label landing on any voxel but its own shows. nnU-Net itself runs (its predictor, preprocessing,
sliding window, mirroring, resampling).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from support.nnunet_model import band_labels, band_phantom, expected_labels, write_band_model
from support.pipeline import flipped
from support.results import ORIENTATIONS

from ai_models import get_pipeline, run_pipeline
from ai_models.nnunet_folder import ModelFolderError, read_model_folder
from dicom_io.types import SourceRef, Volume
from plugin.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from ai_models.nnunet import NnunetPipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_on_one_thread")]  # tests/conftest.py

THRESHOLDS = (-400.0, 200.0, 800.0)


def _volume(
    orientation: str,
    shape: tuple[int, int, int] = (10, 22, 18),
    spacing: tuple[float, float, float] = (2, 2, 2),
) -> Volume:
    """The band phantom on a grid of the given plane (support.results.ORIENTATIONS), spacing (z, y, x) mm."""
    row, column = (np.asarray(v, dtype=float) for v in ORIENTATIONS[orientation])
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row * spacing[2], column * spacing[1]
    affine[:3, 2] = np.cross(row, column) * spacing[0]
    affine[:3, 3] = (-40.0, 30.0, 120.0)
    refs = tuple(SourceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{k}") for k in range(shape[0]))
    return Volume(band_phantom(shape, THRESHOLDS), affine, refs, {"Modality": "CT"})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_band_model(
        tmp_path_factory.mktemp("nnunet") / "Trainer__nnUNetPlans__3d_fullres", THRESHOLDS
    )


@pytest.fixture(scope="module")
def pipeline(model: Path) -> NnunetPipeline:
    from ai_models.nnunet import NnunetPipeline

    built = get_pipeline("nnunet", model_dir=model, use_mirroring=False)  # the registry's way
    assert isinstance(built, NnunetPipeline)
    return built


# --- orientation: what nnU-Net gets, and the way back ------------------------------------------


@pytest.mark.parametrize("plane", ["axial", "sagittal", "oblique"])
@pytest.mark.parametrize("flip", [None, 0, 2])
def test_reorientation_gives_the_trained_axes_and_returns_exactly(plane: str, flip: int | None) -> None:
    """RAS: array axes 0, 1, 2 run to S, A, R in the patient; LPS: to S, P, L; back is the identity."""
    from ai_models.nnunet import Reorientation

    volume = _volume(plane, shape=(6, 9, 7), spacing=(3.0, 2.0, 1.0))
    volume = volume if flip is None else flipped(volume, flip)
    z, y, x = np.indices(volume.shape)
    points = np.stack([x, y, z, np.ones_like(x)], axis=-1).astype(float) @ volume.affine.T  # LPS mm per voxel
    for orientation, signs in (("RAS", (1, -1, -1)), ("LPS", (1, 1, 1))):
        turn = Reorientation.of(volume, orientation)
        for axis, patient in enumerate((2, 1, 0)):  # array axis 0 ~ S, 1 ~ P/A, 2 ~ L/R
            moved = turn.forward(points[..., patient])  # that coordinate of each voxel nnU-Net sees
            step = np.diff(moved, axis=axis) * signs[axis]
            assert (step > 0).all(), (orientation, axis)
        assert sorted(turn.spacing(volume)) == pytest.approx([1.0, 2.0, 3.0])
        assert turn.spacing(volume) == pytest.approx([volume.spacing[axis] for axis in turn.axes])
        assert np.array_equal(turn.backward(turn.forward(volume.voxels)), volume.voxels)
    native = Reorientation.of(volume, "native")
    assert np.array_equal(native.forward(volume.voxels), volume.voxels)


# --- load, predict, map back ---------------------------------------------------------------------


@pytest.mark.parametrize(("plane", "flip"), [("sagittal", 0), ("oblique", 2), ("axial", 1)])
def test_labels_land_on_exactly_their_voxels(pipeline: NnunetPipeline, plane: str, flip: int) -> None:
    """A non-axial, flipped series: every segment is exactly its band (Dice 1), volumes in cm3."""
    import torch

    volume = flipped(_volume(plane), flip)
    findings = run_pipeline(pipeline, volume, torch.device("cpu"))
    truth = expected_labels(volume.voxels, THRESHOLDS)
    assert [s.label for s in findings.segments] == ["Band one", "Band two", "Band three"]
    for segment in findings.segments:
        assert np.array_equal(segment.mask, truth == segment.number), segment.label
        [ml] = findings.measurements_for(segment.number)
        assert ml.value == pytest.approx(float((truth == segment.number).sum()) * 0.008)  # 2 mm voxels
    assert findings.pipeline == "nnunet:Dataset999_RadgateBands" and findings.version.startswith("1.0+")


def test_resampled_to_the_plans_spacing_and_back(pipeline: NnunetPipeline) -> None:
    """5 x 1.5 x 2.5 mm sagittal voxels, resampled by nnU-Net to its 2 mm and back onto the series.

    The band model is blind to position, so this checks nnU-Net's resampling path and the shape it
    returns, not the orientation (the tests above do that, on grids nnU-Net does not resample).
    """
    import torch

    volume = _volume("sagittal", shape=(8, 26, 16), spacing=(5.0, 1.5, 2.5))
    findings = run_pipeline(pipeline, volume, torch.device("cpu"))
    truth = expected_labels(volume.voxels, THRESHOLDS)
    for segment in findings.segments:
        expected = truth == segment.number
        dice = 2.0 * float((segment.mask & expected).sum()) / float(segment.mask.sum() + expected.sum())
        assert dice > 0.75, (segment.label, dice)  # 2 mm blocks of a few voxels: their edges move


def test_2d_configuration_fold_ensemble_best_checkpoint_and_a_variant_trainer(tmp_path: Path) -> None:
    """nnUNetTrainerNoMirroring: nnU-Net's own finder would import the Primus trainers (timm, which
    needs torchvision) before reaching it."""
    import torch

    from ai_models.nnunet import NnunetPipeline

    folder = write_band_model(
        tmp_path / "m",
        THRESHOLDS[:2],
        configuration="2d",
        folds=(0, 3),
        checkpoint="checkpoint_best.pth",
        trainer="nnUNetTrainerNoMirroring",
    )
    pipeline = NnunetPipeline(
        folder, checkpoint="checkpoint_best.pth", orientation="LPS", use_mirroring=False
    )
    assert pipeline.model.folder.folds == (0, 3)  # found as nnU-Net finds them
    volume = flipped(_volume("oblique", shape=(5, 20, 18)), 0)
    findings = run_pipeline(pipeline, volume, torch.device("cpu"))
    truth = expected_labels(volume.voxels, THRESHOLDS[:2])
    for segment in findings.segments:
        assert np.array_equal(segment.mask, truth == segment.number), segment.label


def test_a_partial_label_table_leaves_labels_out_with_a_note(model: Path) -> None:
    import torch

    from ai_models.nnunet import NnunetPipeline

    pipeline = NnunetPipeline(model, labels={2: band_labels(THRESHOLDS)["2"]}, use_mirroring=False)
    findings = run_pipeline(pipeline, _volume("axial"), torch.device("cpu"))
    assert [s.number for s in findings.segments] == [2]
    assert findings.notes == ("label values without a table entry were left out: [1, 3]",)


# --- bad folders and tables: refused when the node starts, saying what is wrong ---------------------


def _config(model_dir: Path, **options: Any) -> Config:
    return Config.model_validate(
        {"pipelines": {"organs": {"kind": "nnunet", "model_dir": str(model_dir), **options}}}
    )


def _broken(model: Path, tmp_path: Path, change: str) -> Path:
    """A copy of the model folder with one thing wrong."""
    copy = Path(shutil.copytree(model, tmp_path / "Trainer__nnUNetPlans__3d_fullres"))
    if change == "no dataset.json":
        (copy / "dataset.json").unlink()
    elif change == "no weights":
        shutil.rmtree(copy / "fold_0")
    elif change == "plans not JSON":
        (copy / "plans.json").write_text("{not json")
    else:
        dataset = json.loads((copy / "dataset.json").read_text())
        plans = json.loads((copy / "plans.json").read_text())
        if change == "two channels":
            dataset["channel_names"] = {"0": "T1", "1": "T2"}
        elif change == "cascade":
            plans["configurations"]["3d_fullres"]["previous_stage"] = "3d_lowres"
        (copy / "dataset.json").write_text(json.dumps(dataset))
        (copy / "plans.json").write_text(json.dumps(plans))
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no dataset.json", "is not an nnU-Net v2 model folder: dataset.json is missing"),
        ("no weights", r"no fold_<N>/checkpoint_final.pth \(weights\) found"),
        ("plans not JSON", "plans.json cannot be read as JSON"),
        ("two channels", "the model takes 2 input channels"),
        ("cascade", "is a cascade stage"),
    ],
)
def test_a_broken_model_folder_stops_the_node_at_start(
    model: Path, tmp_path: Path, change: str, message: str
) -> None:
    from ai_models.nnunet import NnunetPipeline

    broken = _broken(model, tmp_path, change)
    with pytest.raises(ValueError, match=message):
        _config(broken)
    with pytest.raises(ModelFolderError, match=message):
        NnunetPipeline(broken)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"configuration": "2d"}, "no configuration '2d'; it has 3d_fullres"),
        ({"folds": [0, 4]}, r"fold 4 has no weights at fold_4/checkpoint_final.pth"),
        ({"checkpoint": "checkpoint_best.pth"}, "no fold_<N>/checkpoint_best.pth"),
        (
            {"labels": {"7": band_labels(THRESHOLDS)["1"]}},
            r"label table values \[7\] are not labels of the model",
        ),
        ({"labels": {"1": {"label": "No codes"}}}, "needs a 'category' and a 'type' code"),
        ({"tile_step_size": 0}, "tile_step_size"),
        ({"orientation": "RAI"}, "orientation"),
    ],
)
def test_bad_options_are_refused_in_the_configuration(
    model: Path, tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    path = tmp_path / "radgate.yaml"
    path.write_text(
        json.dumps({"pipelines": {"organs": {"kind": "nnunet", "model_dir": str(model), **options}}})
    )
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert "pipelines.organs" in str(raised.value)


def test_the_configuration_and_labels_default_from_the_folder(model: Path, tmp_path: Path) -> None:
    folder = read_model_folder(model)
    assert (folder.configuration, folder.folds, folder.label_values) == ("3d_fullres", (0,), (1, 2, 3))
    config = _config(model, folds=[0], tile_step_size=0.75)
    kind, options = config.pipeline_options("organs")
    assert kind == "nnunet" and options["model_dir"] == model.resolve() and options["folds"] == [0]
    assert options["tile_step_size"] == 0.75 and options["orientation"] == "RAS"
    without_table = Path(shutil.copytree(model, tmp_path / "m"))
    (without_table / "radgate_labels.json").unlink()
    with pytest.raises(ValueError, match=r"radgate_labels\.json"):
        _config(without_table)


def test_region_trained_labels_are_those_of_regions_class_order(model: Path, tmp_path: Path) -> None:
    """A region-based model outputs the values of regions_class_order; a table may name only those."""
    copy = Path(shutil.copytree(model, tmp_path / "regions"))
    dataset = json.loads((copy / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    dataset["regions_class_order"] = [1, 2, 3]
    (copy / "dataset.json").write_text(json.dumps(dataset))
    folder = read_model_folder(copy)
    assert folder.label_names == {1: "whole tumour", 2: "core", 3: "enhancing"}
    dataset["regions_class_order"] = [1, 2]
    (copy / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelFolderError, match="2 regions_class_order entries for 3 regions"):
        read_model_folder(copy)


def test_device_cuda_without_a_gpu_is_refused_when_built(model: Path) -> None:
    import torch

    from ai_models.nnunet import NnunetPipeline

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: device cuda is valid here")

    with pytest.raises(ValueError, match="device is 'cuda' but torch sees no CUDA device"):
        NnunetPipeline(model, device="cuda")
