"""ct-lung on phantoms with exact truth (every orientation, sides from the affine) and on the real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from support.pipeline import flip_mask, flipped, overlay_png, phantom_volume

from ai_models import PipelineError, get_pipeline, run_pipeline
from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom
from dicom_io.types import Findings, Volume

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")  # tests/conftest.py


def _value(findings: Findings, concept_value: str, segment: int | None) -> float:
    [m] = [m for m in findings.measurements if m.concept.value == concept_value and m.segment == segment]
    return m.value


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


Truth = dict[str, npt.NDArray[np.bool_]]


def _check_against_truth(findings: Findings, truth: Truth, voxel_ml: float) -> None:
    """Volumes within 2 %, %LAA-950 within 1 point, masks on the right side of the patient."""
    from ai_models.ct_lung import LAA950

    right, left, emphysema = (findings.segment(i).mask for i in (1, 2, 3))
    for mask, name in ((right, "lung_right"), (left, "lung_left")):
        true_ml = float(truth[name].sum()) * voxel_ml
        assert float(mask.sum()) * voxel_ml == pytest.approx(true_ml, rel=0.02), name
        assert _dice(mask, truth[name]) > 0.97, name
    true_laa = {
        1: 100.0 * float((truth["emphysema"] & truth["lung_right"]).sum()) / float(truth["lung_right"].sum()),
        2: 100.0 * float((truth["emphysema"] & truth["lung_left"]).sum()) / float(truth["lung_left"].sum()),
    }
    for segment, expected in true_laa.items():
        assert _value(findings, LAA950.value, segment) == pytest.approx(expected, abs=1.0)
    lungs = truth["lung_right"] | truth["lung_left"]
    total_laa = 100.0 * float((truth["emphysema"] & lungs).sum()) / float(lungs.sum())
    assert _value(findings, LAA950.value, None) == pytest.approx(total_laa, abs=1.0)
    assert _dice(emphysema, truth["emphysema"]) > 0.95
    assert _value(findings, "118565006", 3) == pytest.approx(float(emphysema.sum()) * voxel_ml)
    assert not (truth["trachea"] & (right | left)).any(), "the trachea must not be part of a lung"


@pytest.fixture(scope="module")
def axial() -> SyntheticSeries:
    return ct_chest_phantom(rows=128, columns=128, slices=60, seed=3)


def test_axial_phantom_volumes_laa_density_codes_and_key_slices(axial: SyntheticSeries) -> None:
    import torch

    from ai_models.ct_lung import EMPHYSEMA, LAA950, LEFT, LUNG, MEAN, RIGHT, VOLUME, CtLungPipeline

    volume = phantom_volume(axial)
    findings = run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
    _check_against_truth(findings, axial.truth, volume.voxel_volume_ml)
    # mean lung density: parenchyma -850 HU, the emphysema sphere -980 HU, noise within 5 HU
    lungs = axial.truth["lung_right"] | axial.truth["lung_left"]
    expected_mld = float(axial.voxels[lungs].mean())
    assert _value(findings, "112031", None) == pytest.approx(expected_mld, abs=2.0)
    both = _value(findings, VOLUME.value, None)
    assert both == pytest.approx(_value(findings, VOLUME.value, 1) + _value(findings, VOLUME.value, 2))
    assert findings.summary_label == "Both lungs"  # the SR group and report card name the totals so
    right, left, emphysema = findings.segments  # the body is a step of the method, not a finding
    assert (right.property_type, right.laterality, left.laterality) == (LUNG, RIGHT, LEFT)
    assert right.category.value == left.category.value == "123037004"
    assert emphysema.property_type == EMPHYSEMA and emphysema.category.value == "49755003"
    units = {m.concept.value: m.unit.value for m in findings.measurements}
    assert units == {"118565006": "cm3", LAA950.value: "%", "112031": "[hnsf'U]"}
    assert all(m.modifier == MEAN for m in findings.measurements if m.concept.value == "112031")
    largest, most_emphysema = findings.key_slices
    assert largest == int(lungs.sum(axis=(1, 2)).argmax())
    assert most_emphysema == int(axial.truth["emphysema"].sum(axis=(1, 2)).argmax())


@pytest.mark.parametrize("keep_body", [True, "yes"])
def test_the_keep_body_option_adds_the_body_segment(axial: SyntheticSeries, keep_body: bool | str) -> None:
    """From a config (bool) or `--option keep_body=yes` (string); the lungs are the same."""
    import torch

    from ai_models.ct_lung import BODY, SEG_BODY, CtLungPipeline

    pipeline = get_pipeline("ct-lung", keep_body=keep_body)
    findings = run_pipeline(pipeline, phantom_volume(axial), torch.device("cpu"))
    body = findings.segment(SEG_BODY)
    assert (body.label, body.property_type) == ("Body", BODY)
    assert _dice(body.mask, axial.truth["body"]) > 0.98
    _check_against_truth(findings, axial.truth, phantom_volume(axial).voxel_volume_ml)
    with pytest.raises(ValueError, match="keep_body"):
        CtLungPipeline(keep_body="maybe")


@pytest.mark.parametrize("orientation", ["sagittal", "coronal", "oblique"])
def test_other_planes_give_the_same_lungs(orientation: str) -> None:
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=128, columns=128, slices=60, orientation=orientation, seed=4)
    volume = phantom_volume(series)
    _check_against_truth(
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu")), series.truth, volume.voxel_volume_ml
    )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sides_come_from_the_affine_not_the_array_order(axial: SyntheticSeries, axis: int) -> None:
    """Storing any axis backwards (with the affine saying so) must not swap left and right."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    volume = flipped(phantom_volume(axial), axis)
    truth = {name: flip_mask(mask, axis) for name, mask in axial.truth.items()}
    _check_against_truth(
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu")), truth, volume.voxel_volume_ml
    )


def test_reverse_instance_order_and_gantry_tilt() -> None:
    import torch

    from ai_models.ct_lung import CtLungPipeline

    for series in (
        ct_chest_phantom(rows=96, columns=96, slices=50, reverse_order=True, seed=5),
        ct_chest_phantom(rows=96, columns=96, slices=50, gantry_tilt_deg=15.0, seed=6),
    ):
        volume = phantom_volume(series)
        findings = run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
        _check_against_truth(findings, series.truth, volume.voxel_volume_ml)


def _paint_bronchi(series: SyntheticSeries) -> npt.NDArray[np.int16]:
    """The phantom with main bronchi: air tubes from the trachea's end into each lung's hilum."""
    voxels = series.voxels.copy()
    z, y, x = np.indices(voxels.shape)
    lps = np.einsum("ij,jzyx->izyx", series.affine[:3], np.stack([x, y, z, np.ones_like(x)]).astype(float))
    carina = np.array([0.0, 5.0, -110.0])  # trachea ends 40 mm above the chest centre (z = -150)
    lungs = series.truth["lung_right"] | series.truth["lung_left"]
    for hilum in (np.array([-45.0, 10.0, -135.0]), np.array([45.0, 10.0, -135.0])):
        d = hilum - carina
        t = np.clip(np.einsum("izyx,i->zyx", lps - carina[:, None, None, None], d) / (d @ d), 0.0, 1.0)
        closest = carina[:, None, None, None] + t * d[:, None, None, None]
        tube = np.linalg.norm(lps - closest, axis=0) <= 6.0
        voxels[tube & ~lungs] = -1000
    return voxels


def test_trachea_and_main_bronchi_are_not_lung() -> None:
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=160, columns=160, slices=100, seed=7)
    voxels = _paint_bronchi(series)
    airway = (voxels <= -995) & ~(series.truth["lung_right"] | series.truth["lung_left"])
    assert airway.sum() > series.truth["trachea"].sum(), "the bronchi were painted"
    volume = Volume(voxels, series.affine, phantom_volume(series).sources, {"Modality": "CT"})
    findings = run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
    _check_against_truth(findings, series.truth, volume.voxel_volume_ml)
    lungs = findings.segment(1).mask | findings.segment(2).mask
    # at most the last centimetre or so of each main bronchus, where it enters the hilum, may count
    assert float((lungs & airway).sum()) / float(airway.sum()) < 0.15


def test_lungs_joined_across_the_midline_are_split_by_side() -> None:
    """A thick bridge of lung tissue in front of the mediastinum: one air region, still two lungs."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=128, columns=128, slices=60, seed=8)
    voxels = series.voxels.copy()
    z, y, x = np.indices(voxels.shape)
    lps = np.einsum("ij,jzyx->izyx", series.affine[:3], np.stack([x, y, z, np.ones_like(x)]).astype(float))
    bridge = (
        (np.abs(lps[0] - 2.0) <= 33.0) & (np.abs(lps[1] + 20.0) <= 30.0) & (np.abs(lps[2] + 150.0) <= 25.0)
    )
    voxels[bridge] = -850
    volume = Volume(voxels, series.affine, phantom_volume(series).sources, {"Modality": "CT"})
    findings = run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
    right, left = findings.segment(1).mask, findings.segment(2).mask
    for mask, own, other in ((right, "lung_right", "lung_left"), (left, "lung_left", "lung_right")):
        assert float((mask & series.truth[own]).sum()) / float(series.truth[own].sum()) > 0.98
        # the parting runs through the bridge where the two lungs' growth meets, not along a plane:
        # it may take a rim of the other lung where the bridge joins it, never more
        assert float((mask & series.truth[other]).sum()) / float(series.truth[other].sum()) < 0.005


def test_a_lung_cut_by_the_field_of_view_stays_a_lung() -> None:
    """A reconstruction too narrow for the patient: the right lung reaches the image border."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=128, columns=128, slices=60, seed=12)
    x_mm = series.affine[0, 0] * np.arange(series.voxels.shape[2]) + series.affine[0, 3]  # axial: column -> x
    first = int(np.nonzero(x_mm >= -110.0)[0][0])  # the right lung spans x -130 .. -20 mm
    affine = series.affine.copy()
    affine[:3, 3] += affine[:3, 0] * first
    cut = np.ascontiguousarray(series.voxels[:, :, first:])
    truth = {name: np.ascontiguousarray(mask[:, :, first:]) for name, mask in series.truth.items()}
    assert truth["lung_right"][:, :, 0].any(), "the right lung reaches the border"
    volume = Volume(cut, affine, phantom_volume(series).sources, {"Modality": "CT"})
    _check_against_truth(
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu")), truth, volume.voxel_volume_ml
    )


def test_air_in_the_oesophagus_beside_a_lung_is_not_lung() -> None:
    """A narrow column of air-filled oesophagus 4 mm from the right lung, at partial-volume HU
    (so not pure gas): near a lung, yet narrower than any piece of lung."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=128, columns=128, slices=60, seed=13)
    voxels = series.voxels.copy()
    z, y, x = np.indices(voxels.shape)
    lps = np.einsum("ij,jzyx->izyx", series.affine[:3], np.stack([x, y, z, np.ones_like(x)]).astype(float))
    oesophagus = (np.hypot(lps[0] + 11.0, lps[1] - 45.0) <= 5.0) & (np.abs(lps[2] + 150.0) <= 60.0)
    assert not (oesophagus & (series.truth["lung_right"] | series.truth["lung_left"])).any()
    voxels[oesophagus] = -800
    volume = Volume(voxels, series.affine, phantom_volume(series).sources, {"Modality": "CT"})
    findings = run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
    _check_against_truth(findings, series.truth, volume.voxel_volume_ml)
    assert not ((findings.segment(1).mask | findings.segment(2).mask) & oesophagus).any()


def test_stomach_gas_is_not_lung() -> None:
    """A 65 mL bubble of pure gas below the lungs (as in the stomach) is not taken for a lung."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=128, columns=128, slices=60, seed=9)
    voxels = series.voxels.copy()
    z, y, x = np.indices(voxels.shape)
    lps = np.einsum("ij,jzyx->izyx", series.affine[:3], np.stack([x, y, z, np.ones_like(x)]).astype(float))
    gas = np.linalg.norm(lps - np.array([0.0, -40.0, -270.0])[:, None, None, None], axis=0) <= 25.0
    assert float(gas.sum()) * series.voxel_volume_ml > 50.0
    voxels[gas] = -1000
    volume = Volume(voxels, series.affine, phantom_volume(series).sources, {"Modality": "CT"})
    findings = run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
    _check_against_truth(findings, series.truth, volume.voxel_volume_ml)
    assert not ((findings.segment(1).mask | findings.segment(2).mask) & gas).any()


def test_real_upper_abdomen_ct_has_no_lungs_and_says_so(testdata: Path) -> None:
    """The real CT shows liver, stomach (with gas) and spleen below the lung bases: no lung to report.

    Its top slice holds only a sliver of right lung base (well under 1 mL); the stomach gas must not
    be taken for lung.
    """
    import torch

    from ai_models.ct_lung import CtLungPipeline
    from dicom_io.volume import load_series

    volume = load_series([testdata / "ct-abdomen-totalseg"])
    pipeline = CtLungPipeline()
    assert pipeline.accepts(volume) is None
    with pytest.raises(PipelineError, match="no lung found"):
        run_pipeline(pipeline, volume, torch.device("cpu"))


def test_a_trunk_without_lungs_is_no_chest_ct() -> None:
    """The phantom with its lungs turned to soft tissue (an abdomen, say) ends with the reason."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=96, columns=96, slices=50, seed=10)
    voxels = series.voxels.copy()
    voxels[series.truth["lung_right"] | series.truth["lung_left"]] = 40
    volume = Volume(voxels, series.affine, phantom_volume(series).sources, {"Modality": "CT"})
    with pytest.raises(PipelineError, match=r"no lung found in this series: .* lung-like air: none"):
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))


def test_a_sliver_of_lung_base_is_no_chest_ct() -> None:
    """Slices that show only the lowest 35 mm of the lungs (the top of an abdominal CT)."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    series = ct_chest_phantom(rows=96, columns=96, slices=100, seed=11)
    z_mm = series.affine[2, 2] * np.arange(series.voxels.shape[0]) + series.affine[2, 3]  # axial: slice -> z
    lungs = series.truth["lung_right"] | series.truth["lung_left"]
    lung_bottom = float(z_mm[lungs.any(axis=(1, 2))].min())
    kept = np.nonzero((z_mm >= lung_bottom - 40.0) & (z_mm <= lung_bottom + 35.0))[0]
    assert kept.size >= 10 and kept[-1] - kept[0] + 1 == kept.size
    affine = series.affine.copy()
    affine[:3, 3] += affine[:3, 2] * kept[0]
    sources = phantom_volume(series).sources[kept[0] : kept[-1] + 1]
    volume = Volume(series.voxels[kept[0] : kept[-1] + 1], affine, sources, {"Modality": "CT"})
    assert CtLungPipeline().accepts(volume) is None
    with pytest.raises(PipelineError, match=r"no lung found in this series: .* mL over \d+ mm head to foot"):
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Modality": "MR"}, "modality is 'MR'"),
        ({"Modality": ""}, "modality is 'missing'"),
    ],
)
def test_wrong_modality_is_refused(axial: SyntheticSeries, change: dict[str, str], reason: str) -> None:
    import torch

    from ai_models.ct_lung import CtLungPipeline

    volume = phantom_volume(axial, **change)
    with pytest.raises(PipelineError, match=reason):
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))


def test_too_few_slices_and_bad_voxels_are_refused(axial: SyntheticSeries) -> None:
    from ai_models.ct_lung import CtLungPipeline

    full = phantom_volume(axial)
    thin = Volume(full.voxels[:3], full.affine, full.sources[:3], dict(full.attributes))
    assert "only 3 slices" in str(CtLungPipeline().accepts(thin))
    nan = full.voxels.astype(np.float32)
    nan[10, 10, 10] = np.nan
    with_nan = Volume(nan, full.affine, full.sources, dict(full.attributes))
    assert "NaN" in str(CtLungPipeline().accepts(with_nan))
    short = ct_chest_phantom(rows=64, columns=64, slices=6, slice_spacing=2.0)
    assert "covers only 12 mm" in str(CtLungPipeline().accepts(phantom_volume(short)))


def test_air_only_volume_is_refused() -> None:
    import torch

    from ai_models.ct_lung import CtLungPipeline

    air = np.full((20, 32, 32), -1000, dtype=np.int16)
    volume = Volume(
        air,
        np.diag([2.0, 2.0, 5.0, 1.0]),
        phantom_volume(ct_chest_phantom(slices=20)).sources,
        {"Modality": "CT"},
    )
    with pytest.raises(PipelineError, match="no body found"):
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))


def test_overlay_picture(axial: SyntheticSeries, tmp_path: Path) -> None:
    """A picture of the key slice, to look at when the method changes (asserts only that it is written)."""
    import torch

    from ai_models.ct_lung import CtLungPipeline

    findings = run_pipeline(CtLungPipeline(), phantom_volume(axial), torch.device("cpu"))
    k = findings.key_slices[1]
    path = tmp_path / "ct_lung.png"
    overlay_png(axial.voxels[k], [findings.segment(i).mask[k] for i in (1, 2, 3)], path, (-1000, 400))
    assert path.stat().st_size > 0
