"""ct-lung on a real chest CT, scored end to end: SEG written, read back, Dice against clinical contours.

The case is LUNG1-001 of NSCLC-Radiomics (see shared/testdata/README.md): 134 axial slices with a
tumour, and the radiotherapy contours `Lung L` / `Lung R`, given as the RTSTRUCT itself and
rasterised onto the CT grid (`lungs-reference.nii.gz`: 1 left, 2 right, RAS affine). The pipeline
runs the way `radgate run --pipeline ct-lung` runs it; the SEG it wrote and both references are
read onto the CT grid by `radgate validate`'s reader (`dicom_io.reference`) and scored by its
scoring (`dicom_io.scoring`).
`radgate validate` itself runs on the case here too, its report checked against this run's
findings: the pipeline's run on the case is the module's cost, so it is made once (the validate
command gets the module's run back, and each HD95 is computed once: `computed_once`); so is each
read of the case's series and of its references.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from support.pipeline import heap_kept, one_torch_thread, remember_runs, remembering

from dicom_io import scoring
from dicom_io.reference import Reference, read_reference
from dicom_io.scoring import Score, dice, match_structures, score
from dicom_io.types import Findings, Volume
from plugin.cli import main
from plugin.offline import run as offline
from plugin.offline.run import DICOM_DIR, run_offline

CASE = "ct-chest-nsclc-lung1-001"
# the reference structure of each lung in the NIfTI label map and in the RTSTRUCT
REFERENCES = {
    "lungs-reference.nii.gz": {"Left lung": "1", "Right lung": "2"},
    "rtstruct.dcm": {"Left lung": "Lung L", "Right lung": "Lung R"},
}
MIN_DICE = 0.95
MAX_VOLUME_ERROR = 0.07
MAX_HD95_MM = 20.0  # version 1 was at 37-59 mm; the tumour parts the contours include dominate
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Scored:
    seg: Reference  # the SEG the run wrote, read back onto the CT grid
    segments: dict[str, Mask]  # SEG segment label -> mask on the CT grid (z, y, x)
    truths: dict[tuple[str, str], Mask]  # (reference file, lung) -> the reference's mask
    scores: dict[tuple[str, str], Score]  # (reference file, lung) -> its score


def _mask(reference: Reference, name: str) -> Mask:
    [structure] = [s for s in reference.structures if s.name == name]
    return reference.mask(structure)


@pytest.fixture(scope="module", autouse=True)
def computed_once() -> Iterator[None]:
    """ct-lung's run, HD95 and `radgate run`'s series loading remembered for the module (pure
    functions: an input equal to an earlier one gets that result back), so `radgate validate` on the
    case reuses the module's run and the scores the module already computed, and the module's CT is
    the one `radgate run` loaded; large blocks kept on the heap (`heap_kept`), torch on one thread."""
    from ai_models.ct_lung import CtLungPipeline

    with pytest.MonkeyPatch.context() as patch, heap_kept(), one_torch_thread():
        remember_runs(patch, CtLungPipeline, "keep_body")
        patch.setattr(scoring, "hd95", remembering(scoring.hd95))
        patch.setattr(offline, "load_series", remembering(offline.load_series))
        yield


@dataclass(frozen=True)
class Run:
    out: Path  # what `radgate run` wrote (the SEG in out / DICOM_DIR)
    findings: Findings
    volume: Volume  # the case's CT


@pytest.fixture(scope="module")
def run(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """ct-lung on the case, once for the module (most of its CPU time)."""
    import torch

    case = testdata / CASE
    out = tmp_path_factory.mktemp("lung1")
    findings = run_offline("ct-lung", case / "ct", out, device=torch.device("cpu"), progress=False)
    return Run(out, findings, offline.load_series(offline.input_files(case / "ct")))


def _seg_path(run: Run) -> Path:
    [seg_path] = [
        p
        for p in (run.out / DICOM_DIR).iterdir()
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
    ]
    return seg_path


@pytest.fixture(scope="module")
def scored(testdata: Path, run: Run) -> Scored:
    case = testdata / CASE
    volume = run.volume
    seg_path = _seg_path(run)
    seg = read_reference(seg_path, volume)
    segments = {s.name: seg.mask(s) for s in seg.structures}
    truths, scores = {}, {}
    for file, names in REFERENCES.items():
        reference = read_reference(case / file, volume)
        for lung, name in names.items():
            truths[file, lung] = _mask(reference, name)
            scores[file, lung] = score(
                lung,
                name,
                "map",
                segments[lung],
                truths[file, lung],
                volume.spacing,
                volume.voxel_volume_ml,
            )
    return Scored(seg, segments, truths, scores)


@pytest.mark.slow  # ct-lung on the real chest CT (the module fixture)
def test_the_seg_holds_the_lungs_and_emphysema_not_the_body(scored: Scored) -> None:
    assert set(scored.segments) == {"Right lung", "Left lung", "Emphysema (LAA-950)"}
    lungs = scored.segments["Right lung"] | scored.segments["Left lung"]
    assert not (scored.segments["Right lung"] & scored.segments["Left lung"]).any()
    assert not (scored.segments["Emphysema (LAA-950)"] & ~lungs).any(), "emphysema outside the lungs"


@pytest.mark.parametrize("reference", sorted(REFERENCES))
@pytest.mark.parametrize("lung", ["Left lung", "Right lung"])
def test_each_lung_matches_the_clinical_contour(scored: Scored, reference: str, lung: str) -> None:
    s = scored.scores[reference, lung]
    assert s.dice >= MIN_DICE, f"{lung} against {reference}: Dice {s.dice:.3f}"
    assert abs(s.difference_percent) <= 100 * MAX_VOLUME_ERROR, (
        f"{lung}: {s.pipeline_ml:.0f} mL, contour {s.reference_ml:.0f} mL"
    )
    assert s.hd95_mm is not None and s.hd95_mm <= MAX_HD95_MM, f"{lung}: HD95 {s.hd95_mm} mm"


@pytest.mark.slow
def test_validate_command_on_the_case(testdata: Path, run: Run, scored: Scored, tmp_path: Path) -> None:
    """`radgate validate` end to end with the real ct-lung: the report's structure and figures, not the
    pipeline's quality (tests/unit/test_validate.py tests the command on phantoms)."""
    case, volume, findings = testdata / CASE, run.volume, run.findings
    out = tmp_path / "report"
    argv = ["validate", "--pipeline", "ct-lung", "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--reference", str(case / "rtstruct.dcm"), str(case)]) == 0
    document = json.loads((out / "validation.json").read_text())
    [result] = document["cases"]
    assert result["reference_kind"] == "RTSTRUCT" and result["error"] is None
    rows = {row["segment"]: row for row in result["structures"]}
    assert {rows["Left lung"]["reference"], rows["Right lung"]["reference"]} == {"Lung L", "Lung R"}
    for label in ("Left lung", "Right lung"):
        truth = scored.truths["rtstruct.dcm", label]  # Lung L, Lung R
        [segment] = [s for s in findings.segments if s.label == label]
        row = rows[label]
        assert 0.0 <= row["dice"] <= 1.0
        assert row["dice"] == pytest.approx(dice(segment.mask, truth), abs=1e-12)
        assert row["hd95_mm"] == pytest.approx(scoring.hd95(segment.mask, truth, volume.spacing), abs=1e-9)
        assert row["reference_ml"] == pytest.approx(truth.sum() * volume.voxel_volume_ml)
        assert row["pipeline_ml"] == pytest.approx(segment.mask.sum() * volume.voxel_volume_ml)
        assert row["difference_ml"] == pytest.approx(row["pipeline_ml"] - row["reference_ml"])
    with (out / "validation.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {(r["segment"], float(r["dice"])) for r in table} == {(k, v["dice"]) for k, v in rows.items()}
    summary = {s["segment"]: s for s in document["summary"]}
    assert (
        summary["Left lung"]["dice_worst"] == rows["Left lung"]["dice"] == summary["Left lung"]["dice_mean"]
    )

    # the pipeline's own SEG as a reference: read back onto the grid (`scored`) and matched, it
    # scores exactly 1
    own = scored.seg
    assert own.kind == "SEG"
    for m in match_structures(own.structures, findings.segments):
        assert m.structure.name == m.segment.label
        np.testing.assert_array_equal(own.mask(m.structure), m.segment.mask, err_msg=m.segment.label)
