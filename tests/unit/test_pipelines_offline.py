"""`radgate run`: a pipeline on a folder of DICOM files, with its interim and DICOM outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from support.pipeline import BONE, write_threshold_bundle

from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom, mr_head_phantom
from plugin.cli import main
from plugin.offline.run import parse_options

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSeries, Path]:
    series = ct_chest_phantom(rows=80, columns=80, slices=36, seed=21)
    folder = tmp_path_factory.mktemp("ct")
    series.write(folder)
    return series, folder


def test_run_writes_findings_json_segments_npz_and_dicom_results(
    phantom: tuple[SyntheticSeries, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series, folder = phantom
    out = tmp_path / "out"
    assert main(["run", "--pipeline", "ct-lung", str(folder), "--out", str(out), "--device", "cpu"]) == 0
    assert "Volume [segment 1]:" in capsys.readouterr().out

    document = json.loads((out / "findings.json").read_text())
    assert (document["pipeline"], document["device"], document["shape"]) == ("ct-lung", "cpu", [36, 80, 80])
    assert np.allclose(document["affine_lps"], series.affine)
    labels = {s["number"]: s["label"] for s in document["segments"]}
    assert labels == {1: "Right lung", 2: "Left lung", 3: "Emphysema (LAA-950)"}  # no body by default
    right = next(s for s in document["segments"] if s["number"] == 1)
    assert right["laterality"] == {"value": "24028007", "scheme": "SCT", "meaning": "Right"}
    volumes = {
        m["segment"]: m["value"] for m in document["measurements"] if m["concept"]["value"] == "118565006"
    }
    assert volumes[1] == pytest.approx(series.truth_ml("lung_right"), rel=0.02)

    with np.load(out / "segments.npz") as npz:
        assert np.array_equal(npz["segment_2"], series.truth["lung_left"])
        assert np.allclose(npz["affine"], series.affine)

    kinds = sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in (out / "dicom").iterdir()
    )
    assert "SEG" in kinds and "SR" in kinds


def test_run_on_a_series_the_pipeline_cannot_use_fails_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mr"
    mr_head_phantom(rows=32, columns=32, slices=24).write(folder)
    assert (
        main(["run", "--pipeline", "ct-lung", str(folder), "--out", str(tmp_path / "o"), "--no-dicom"]) == 1
    )
    assert "ct-lung: modality is 'MR', this pipeline needs CT" in capsys.readouterr().err
    assert not (tmp_path / "o" / "findings.json").exists()


def test_run_with_an_unknown_pipeline_or_bad_option(
    phantom: tuple[SyntheticSeries, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, folder = phantom
    assert main(["run", "--pipeline", "nope", str(folder), "--out", str(tmp_path)]) == 1
    assert "no pipeline named 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["bundle_dir"])
    assert parse_options(["bundle_dir=/x=y", "labels=l.json"]) == {"bundle_dir": "/x=y", "labels": "l.json"}


def test_run_passes_options_to_the_pipeline(
    phantom: tuple[SyntheticSeries, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series, folder = phantom
    bundle = write_threshold_bundle(tmp_path / "bundle", resample=False)
    out = tmp_path / "out"
    argv = ["run", "--pipeline", "monai-bundle", str(folder), "--out", str(out), "--no-dicom"]
    assert main([*argv, "--option", f"bundle_dir={bundle}"]) == 0
    document = json.loads((out / "findings.json").read_text())
    assert document["pipeline"] == "monai-bundle:bone_threshold"
    with np.load(out / "segments.npz") as npz:
        assert np.array_equal(npz["segment_1"], series.truth["bone"])
    assert main([*argv, "--option", "bundle_dir=/nonexistent"]) == 1
    assert "not a MONAI bundle" in capsys.readouterr().err


def test_run_takes_a_configured_pipeline_from_the_config(
    phantom: tuple[SyntheticSeries, Path], tmp_path: Path
) -> None:
    series, folder = phantom
    bundle = write_threshold_bundle(tmp_path / "bundle", resample=False)
    config = tmp_path / "radgate.yaml"
    settings = {
        "kind": "monai-bundle",
        "bundle_dir": str(bundle),
        "labels": {1: {**BONE["1"], "label": "Hard"}},
    }
    config.write_text(yaml.safe_dump({"pipelines": {"bones": settings}}))
    out = tmp_path / "out"
    argv = [
        "run",
        "--config",
        str(config),
        "--pipeline",
        "bones",
        str(folder),
        "--out",
        str(out),
        "--no-dicom",
    ]
    assert main(argv) == 0
    document = json.loads((out / "findings.json").read_text())
    assert [s["label"] for s in document["segments"]] == ["Hard"]
    with np.load(out / "segments.npz") as npz:
        assert np.array_equal(npz["segment_1"], series.truth["bone"])
