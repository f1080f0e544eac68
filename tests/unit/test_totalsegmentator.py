"""totalsegmentator without running a model: its code table, the weight check, its config, offline.

The model run itself (fake weights, SEG and SR) is tests/integration/test_totalsegmentator_results.py.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support.results import make_series
from support.totalseg_weights import place_weights

from ai_models import PipelineError, get_pipeline, totalseg_catalog
from ai_models.totalseg_catalog import (
    SNOMED_TABLE,
    WeightsMissingError,
    download_command,
    label_table,
    models,
    structures,
)
from dicom_io.labels import load_label_table
from plugin.config import ConfigError, load_config

PUBLISHED = Path(__import__("totalsegmentator").__file__).parent / SNOMED_TABLE


def _published() -> dict[str, dict[str, str]]:
    with PUBLISHED.open(newline="", encoding="utf-8") as handle:
        return {row["Structure"]: row for row in csv.DictReader(handle)}


def _triple(row: dict[str, str], sequence: str) -> tuple[str, str, str] | None:
    value = row[f"{sequence}.CodeValue"]
    scheme, meaning = row[f"{sequence}.CodingSchemeDesignator"], row[f"{sequence}.CodeMeaning"]
    return (value, scheme, meaning) if value else None


def test_the_117_structures_carry_the_codes_totalsegmentator_publishes() -> None:
    table, rows = label_table(), _published()
    assert sorted(table) == list(range(1, 118))
    assert {value: spec.label for value, spec in table.items()} == structures()
    for spec in table.values():
        row = rows[spec.label]
        as_triples = {
            "category": (spec.category.value, spec.category.scheme, spec.category.meaning),
            "type": (spec.property_type.value, spec.property_type.scheme, spec.property_type.meaning),
        }
        assert as_triples == {
            "category": _triple(row, "SegmentedPropertyCategoryCodeSequence"),
            "type": _triple(row, "SegmentedPropertyTypeCodeSequence"),
        }, spec.label
        region = _triple(row, "AnatomicRegionSequence")
        assert (spec.anatomic_region and astuple(spec.anatomic_region)) == region, spec.label
        laterality = _triple(row, "SegmentedPropertyTypeModifierCodeSequence") or _triple(
            row, "AnatomicRegionModifierSequence"
        )
        assert (spec.laterality and astuple(spec.laterality)) == laterality, spec.label
        assert spec.color_rgb == tuple(int(c) for c in row["DicomRGBColor"].split(",")), spec.label
    # a few by hand, so a table that changed under us shows here and not only in the loop above
    assert astuple(table[1].property_type) == ("78961009", "SCT", "Spleen") and table[1].laterality is None
    left_kidney = table[3]
    assert left_kidney.label == "kidney_left" and astuple(left_kidney.property_type)[0] == "64033007"
    assert left_kidney.laterality is not None and left_kidney.laterality.value == "7771000"
    cyst = table[23]  # coded by region: a cyst (type) in the left (region modifier) kidney (region)
    assert cyst.label == "kidney_cyst_left" and cyst.category.meaning == "Morphologically Altered Structure"
    assert cyst.anatomic_region is not None and cyst.anatomic_region.value == "64033007"
    assert cyst.laterality is not None and cyst.laterality.meaning == "Left"
    lateral = [spec for spec in table.values() if spec.laterality is not None]
    assert len(lateral) == 65 and {s.laterality.meaning for s in lateral if s.laterality} == {"Left", "Right"}


def astuple(code: Any) -> tuple[str, str, str]:
    return (code.value, code.scheme, code.meaning)


def test_a_label_table_in_json_carries_a_laterality_too() -> None:
    """The JSON form (monai-bundle and nnunet tables) takes the same laterality as this table."""
    spec = label_table()[3]  # kidney_left
    entry = {
        "label": spec.label,
        "category": astuple(spec.category),
        "type": astuple(spec.property_type),
        "laterality": ["7771000", "SCT", "Left"],
        "color": list(spec.color_rgb),
    }
    assert load_label_table({"3": entry}) == {3: spec}


def test_every_code_is_a_valid_highdicom_segment_description() -> None:
    import highdicom as hd

    from dicom_io.results.seg import coded

    algorithm = hd.AlgorithmIdentificationSequence(
        name="TotalSegmentator", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing"), version="2"
    )
    for value, spec in label_table().items():
        description = hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=spec.label,
            segmented_property_category=coded(spec.category),
            segmented_property_type=coded(spec.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[coded(spec.anatomic_region)] if spec.anatomic_region else None,
        )
        assert description.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        if spec.laterality is not None:
            hd.sr.CodedConcept.from_dataset(coded(spec.laterality))


@pytest.mark.parametrize("fast", [True, False])
def test_missing_weights_stop_the_pipeline_with_the_command_that_fetches_them(
    tmp_path: Path, fast: bool
) -> None:
    from ai_models.totalsegmentator import TotalSegmentatorPipeline

    command = f"TOTALSEG_HOME_DIR={tmp_path} totalseg_download_weights -t {'total_fast' if fast else 'total'}"
    assert download_command(tmp_path, fast) == command
    with pytest.raises(WeightsMissingError) as err:
        TotalSegmentatorPipeline(tmp_path, fast=fast)
    assert str(err.value).endswith(f"fetch them with: {command}")
    first = models(fast, False)[0]
    assert first.dataset in str(err.value)
    with pytest.raises(ConfigError) as config_err:
        load_config(_config(tmp_path, weights_dir=str(tmp_path), fast=fast))
    assert (
        f"pipelines.organs.totalsegmentator: Value error, TotalSegmentator weights missing in {tmp_path}"
        in str(config_err.value)
    )
    assert command in str(config_err.value)


def test_the_command_fetches_every_model_the_mode_runs() -> None:
    from totalsegmentator.bin.totalseg_download_weights import TASK_TO_ID

    for fast in (True, False):
        task = download_command(Path("/w"), fast).rsplit(" ", 1)[1]
        assert {m.task_id for m in models(fast, roi_subset=True)} <= set(TASK_TO_ID[task])


def test_an_roi_subset_needs_the_crop_model_as_well(tmp_path: Path) -> None:
    from ai_models.totalsegmentator import TotalSegmentatorPipeline

    place_weights(tmp_path, fast=True, real=False)
    TotalSegmentatorPipeline(tmp_path, fast=True)  # the 3 mm model is there
    with pytest.raises(WeightsMissingError, match="Dataset298_TotalSegmentator_total_6mm"):
        TotalSegmentatorPipeline(tmp_path, fast=True, roi_subset=["liver"])
    place_weights(tmp_path, fast=True, roi_subset=True, real=False)
    pipeline = TotalSegmentatorPipeline(tmp_path, fast=True, roi_subset=["liver", "kidney_left"])
    assert [spec.label for spec in pipeline.labels.values()] == ["kidney_left", "liver"]  # by label value


def _config(tmp_path: Path, **organs: object) -> Path:
    path = tmp_path / "radgate.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"organs": {"kind": "totalsegmentator", **organs}}}))
    return path


def test_a_configured_totalsegmentator_builds_from_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    place_weights(tmp_path / "weights", fast=True, roi_subset=True, real=False)
    monkeypatch.chdir(tmp_path)
    config = load_config(
        _config(tmp_path, weights_dir="weights", fast=True, roi_subset=["spleen"], device="cpu", min_slices=4)
    )
    kind, options = config.pipeline_options("organs")
    assert (kind, options) == (
        "totalsegmentator",
        {
            "weights_dir": tmp_path / "weights",  # absolute: workers may run in another folder
            "fast": True,
            "roi_subset": ("spleen",),
            "device": "cpu",
            "min_slices": 4,
        },
    )
    pipeline = get_pipeline(kind, **options)
    assert (pipeline.name, pipeline.version) == ("totalsegmentator", "2.18.0-total_fast")
    assert [spec.label for spec in pipeline.labels.values()] == ["spleen"]  # type: ignore[attr-defined]
    assert pipeline.series.min_slices == 4  # type: ignore[attr-defined]
    series = make_series(shape=(3, 8, 8))
    assert "only 3 slices" in str(pipeline.accepts(series.volume))


@pytest.mark.parametrize(
    ("organs", "named"),
    [
        (
            {"weights_dir": "/no/such/folder"},
            "pipelines.organs.totalsegmentator.weights_dir: Value error, /no/such/folder is not",
        ),
        (
            {"roi_subset": ["livr"]},
            "not structures of TotalSegmentator's task total: 'livr' (did you mean 'liver'?)",
        ),
        ({"roi_subset": []}, "pipelines.organs.totalsegmentator.roi_subset"),
        ({"device": "gpu"}, "pipelines.organs.totalsegmentator.device"),
        ({"task": "total_mr"}, "pipelines.organs.totalsegmentator.task: unknown key"),
        ({"min_slices": 0}, "pipelines.organs.totalsegmentator.min_slices"),
    ],
)
def test_a_wrong_totalsegmentator_setting_names_its_key(
    tmp_path: Path, organs: dict[str, object], named: str
) -> None:
    weights = place_weights(tmp_path / "weights", fast=True, roi_subset=True, real=False)
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, **{"weights_dir": str(weights), "fast": True, **organs}))
    assert named in str(err.value)


def test_without_the_package_the_config_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(totalseg_catalog, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs TotalSegmentator \(pip install 'radgate\[nnunet\]'\)"):
        load_config(_config(tmp_path, weights_dir=str(tmp_path)))


@pytest.fixture()
def network_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every name lookup or connection attempted (and refused), e.g. TotalSegmentator's statistics."""
    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(repr(args[:2]))
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield calls


def test_a_run_sends_no_statistics_and_leaves_the_environment_as_it_was(
    tmp_path: Path, network_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from totalsegmentator.config import (
        get_config,
        increase_prediction_counter,
        send_usage_stats,
        setup_totalseg,
    )
    from totalsegmentator.libs import download_pretrained_weights

    from ai_models.totalsegmentator import offline_totalseg

    params = {"task": "total", "fast": True, "preview": False, "multilabel": True, "roi_subset": None}
    params |= {"statistics": False, "radiomics": False}
    # the probe works: TotalSegmentator's defaults in a home of its own do send statistics
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "default-home"))
    setup_totalseg()
    send_usage_stats(increase_prediction_counter(), dict(params))
    assert network_calls and "stats.totalsegmentator.com" in network_calls[0]
    network_calls.clear()

    weights = place_weights(tmp_path / "weights", fast=True, real=False)
    before = {
        key: os.environ.get(key) for key in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "nnUNet_results")
    }
    with offline_totalseg(weights) as home:
        assert json.loads((home / "config.json").read_text())["send_usage_stats"] is False
        assert os.environ["TOTALSEG_WEIGHTS_PATH"] == str(weights / "nnunet" / "results")
        setup_totalseg()
        send_usage_stats(increase_prediction_counter(), dict(params))
        assert get_config()["prediction_counter"] == 1
        download_pretrained_weights(297)  # present: nothing to fetch
    assert network_calls == []
    assert not home.exists()
    assert {key: os.environ.get(key) for key in before} == before


def test_a_trainer_no_module_defines_is_refused_by_name() -> None:
    """Found ones: tests/integration/test_totalsegmentator_results.py (importing them takes seconds)."""
    from ai_models.totalsegmentator import trainer_class

    with pytest.raises(LookupError, match="no trainer class 'nnUNetTrainerNope'"):
        trainer_class("nnUNetTrainerNope")


def test_the_label_map_must_come_back_on_the_input_grid() -> None:
    import nibabel as nib

    from ai_models.totalsegmentator import from_nifti, to_nifti

    volume = make_series("oblique", shape=(4, 6, 8)).volume
    image = to_nifti(volume)
    assert image.shape == (8, 6, 4)
    labels = np.arange(volume.voxels.size, dtype=np.int32).reshape(volume.shape)
    back = nib.Nifti1Image(labels.transpose(2, 1, 0).astype(np.uint8), image.affine)
    assert np.array_equal(from_nifti(back, volume, "totalsegmentator"), labels.astype(np.uint8))
    moved = image.affine.copy()
    moved[0, 3] += 1.0
    for wrong in (
        nib.Nifti1Image(np.zeros((8, 6, 3), np.uint8), image.affine),
        nib.Nifti1Image(back.dataobj, moved),
    ):
        with pytest.raises(PipelineError, match="not on the input grid"):
            from_nifti(wrong, volume, "totalsegmentator")


def test_the_device_totalsegmentator_is_given(tmp_path: Path) -> None:
    import torch

    from ai_models.totalsegmentator import TotalSegmentatorPipeline

    weights = place_weights(tmp_path, fast=True, real=False)
    auto = TotalSegmentatorPipeline(weights, fast=True)
    assert auto._device(torch.device("cpu")) == "cpu"
    assert auto._device(torch.device("cuda", 1)) == "gpu:1"
    assert (
        TotalSegmentatorPipeline(weights, fast=True, device="cpu")._device(torch.device("cuda", 0)) == "cpu"
    )
    cuda = TotalSegmentatorPipeline(weights, fast=True, device="cuda")
    if torch.cuda.is_available():
        assert cuda._device(torch.device("cpu")) == "gpu"
    else:
        with pytest.raises(PipelineError, match="no GPU"):
            cuda._device(torch.device("cpu"))
