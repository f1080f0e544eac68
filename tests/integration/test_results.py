"""write_results end to end: files, OHIF's loaders (viewercheck), KOS, stable UIDs, and bad input."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from support.results import (
    EMPHYSEMA,
    ML,
    ORGAN,
    VOLUME,
    Series,
    check_frames_on_sources,
    check_masks,
    load_real,
    lung_findings,
    make_series,
    require,
    viewercheck_tool,
)
from support.testdata import TESTDATA, needs_testdata

from dicom_io.results import ResultError, ResultOptions, build_results, write_results
from dicom_io.results.reading import read_prior, sr_measurements
from dicom_io.testing import validate
from dicom_io.testing.synthetic import ct_chest_phantom
from dicom_io.types import Findings, Measurement, Segment, Volume
from dicom_io.volume import load_series


@pytest.fixture(scope="session")
def viewercheck_dir() -> Path:
    return viewercheck_tool()


def _save_sources(datasets: list[Dataset], directory: Path) -> Path:
    directory.mkdir()
    for ds in datasets:
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return directory


def _by_kind(paths: list[Path]) -> dict[str, list[Path]]:
    kinds: dict[str, list[Path]] = {}
    for path in paths:
        kinds.setdefault(path.name.split("-")[0], []).append(path)
    return kinds


def _unexpected(warnings: tuple[str, ...]) -> list[str]:
    """viewercheck's warnings but the expected one: OHIF hydrates the SR's planar groups as probes
    and not its volumetric groups (TID 1411 maps onto no Cornerstone tool)."""
    return [w for w in warnings if not (w.startswith("WARN sr.hydration:") and "(Probe)" in w)]


@dataclass
class Built:
    """A viewer case: its result files by kind, its source folder, what else its test checks, and
    viewercheck's verdict."""

    paths: dict[str, list[Path]]
    sources: Path
    extra: dict[str, Any] = field(default_factory=dict)
    viewer: validate.Validation | None = None


Builder = Callable[[str, Path], Built]
VIEWER_CASES: dict[str, Callable[[Path], Built]] = {}
"""Test node name -> how its files are built (in the given folder): viewercheck runs on all at once."""


def viewer_case(test: str, params: Sequence[str] = ()) -> Callable[[Builder], Builder]:
    """Registers a builder, called with each of the test's parameters (or "" for none) and a folder."""

    def register(build: Builder) -> Builder:
        for param in params or ("",):
            VIEWER_CASES[f"{test}[{param}]" if param else test] = functools.partial(build, param)
        return build

    return register


@pytest.fixture(scope="module")
def viewed(
    request: pytest.FixtureRequest, viewercheck_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Built | Exception]:
    """The viewer cases of this module's selected tests, built, and checked by viewercheck in one Node.

    One Node process loads OHIF's code once for every case (validate.viewercheck_many); each case still
    gets check.js's own run and verdict. A case that could not be built holds the exception, which its
    test raises.
    """
    names = sorted(
        {
            item.name
            for item in request.session.items
            if item.module is request.module and "viewed" in item.fixturenames
        }
    )
    built: dict[str, Built | Exception] = {}
    for name in names:
        try:
            built[name] = VIEWER_CASES[name](tmp_path_factory.mktemp("viewer"))
        except Exception as exc:  # raised again by the case's own test
            built[name] = exc
    ready = {name: case for name, case in built.items() if isinstance(case, Built)}
    jobs = [
        (case.paths["SEG"][0], case.paths["SR"][0] if case.extra.get("with_sr", True) else None, case.sources)
        for case in ready.values()
    ]
    for case, result in zip(ready.values(), validate.viewercheck_many(viewercheck_dir, jobs), strict=True):
        case.viewer = result
    return built


def _viewed(
    viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> tuple[Built, validate.Validation]:
    """This test's case and viewercheck's verdict on it; skips where viewercheck is not installed."""
    case = viewed[request.node.name]
    if isinstance(case, Exception):
        raise case
    assert case.viewer is not None
    return case, require(case.viewer)


def test_write_results_writes_valid_files(tmp_path: Path) -> None:
    series = make_series("sagittal")
    paths = write_results(
        lung_findings(series.volume),
        series.volume,
        series.datasets,
        tmp_path / "out",
        ResultOptions(write_kos=True),
    )
    kinds = _by_kind(paths)
    assert {k: len(v) for k, v in kinds.items()} == {"SEG": 1, "SR": 1, "SC": 2, "KO": 1}
    assert paths[0] == kinds["SEG"][0]  # the SEG goes before the SR that references it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    numbers = {kind: {int(pydicom.dcmread(p).SeriesNumber) for p in ps} for kind, ps in kinds.items()}
    assert numbers == {"SEG": {1003}, "SR": {1004}, "SC": {1005}, "KO": {1006}}
    for path in paths:
        result = require(validate.dciodvfy(path))
        assert result.ok, f"{path.name}: {result}"
    sources = _save_sources(series.datasets, tmp_path / "src")
    consistency = require(validate.dcentvfy([*paths, *sorted(sources.iterdir())]))
    assert consistency.ok, str(consistency)
    kos = pydicom.dcmread(kinds["KO"][0])
    listed = {
        item.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert listed == {pydicom.dcmread(p).SOPInstanceUID for p in kinds["SC"]}


ORIENTATIONS = ("axial", "sagittal", "oblique")


@viewer_case("test_ohif_loads_seg_and_sr", ORIENTATIONS)
def _seg_and_sr(orientation: str, tmp: Path) -> Built:
    series = make_series(orientation)
    paths = _by_kind(write_results(lung_findings(series.volume), series.volume, series.datasets, tmp / "out"))
    return Built(paths, _save_sources(series.datasets, tmp / "src"))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_ohif_loads_seg_and_sr(
    orientation: str, viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> None:
    _, result = _viewed(viewed, request)
    assert result.ok, result.output
    assert not _unexpected(result.warnings), result.warnings


@viewer_case("test_ohif_loads_an_sr_compared_with_a_prior")
def _compared_with_a_prior(_: str, tmp: Path) -> Built:
    series = make_series()
    findings = lung_findings(series.volume)
    earlier = build_results(findings, series.volume, series.datasets, ResultOptions(write_sc=False))
    prior = replace(read_prior(earlier.sr), study_uid="1.2.826.0.1.3680043.10.1234.78", study_date="20250101")
    grown = replace(
        findings, measurements=tuple(replace(m, value=m.value * 1.05) for m in findings.measurements)
    )
    options = ResultOptions(write_sc=False, prior=prior)
    paths = _by_kind(write_results(grown, series.volume, series.datasets, tmp / "out", options))
    return Built(paths, _save_sources(series.datasets, tmp / "src"))


def test_ohif_loads_an_sr_compared_with_a_prior(
    viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> None:
    """The change NUMs and the prior in the evidence keep the report loadable in OHIF."""
    case, result = _viewed(viewed, request)
    assert any("change" in row[1] for row in sr_measurements(pydicom.dcmread(case.paths["SR"][0])))
    assert result.ok, result.output
    assert not _unexpected(result.warnings), result.warnings


REAL_SERIES = ("ct-abdomen-totalseg", "mr-brain-t1-mprage")


@viewer_case("test_ohif_loads_results_on_real_series", REAL_SERIES)
def _real_series(name: str, tmp: Path) -> Built:
    datasets, volume = load_real(TESTDATA / name)
    findings = lung_findings(volume)
    paths = _by_kind(write_results(findings, volume, datasets, tmp / "out", ResultOptions(write_sc=False)))
    return Built(paths, _save_sources(datasets, tmp / "src"))


@needs_testdata
@pytest.mark.parametrize("name", REAL_SERIES)
def test_ohif_loads_results_on_real_series(
    name: str, viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> None:
    _, result = _viewed(viewed, request)
    assert result.ok, result.output


def test_same_input_gives_the_same_uids() -> None:
    series = make_series()
    findings = lung_findings(series.volume)
    first = build_results(findings, series.volume, series.datasets)
    again = build_results(findings, series.volume, series.datasets)
    other = build_results(findings, series.volume, series.datasets, ResultOptions(uid_seed="rerun-2"))
    uids = [ds.SOPInstanceUID for ds in first.datasets]
    assert uids == [ds.SOPInstanceUID for ds in again.datasets]
    assert not set(uids) & {ds.SOPInstanceUID for ds in other.datasets}
    assert len(set(uids)) == len(uids)


# --- bad input: a clear ResultError, and nothing written ---------------------------------------


def _shifted(volume: Volume, millimetres: float) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] += millimetres
    return Volume(volume.voxels, affine, volume.sources, volume.attributes)


def _with(ds: Dataset, **changes: object) -> Dataset:
    """A deep copy with changes (Dataset.copy() shares the elements with the original)."""
    changed = copy.deepcopy(ds)
    for keyword, value in changes.items():
        setattr(changed, keyword, value)
    return changed


def _edit(series: Series, index: int, **changes: object) -> list[Dataset]:
    """The series with one dataset changed."""
    return [_with(ds, **changes) if i == index else ds for i, ds in enumerate(series.datasets)]


BAD_INPUTS = {
    "mask grid is not the volume grid": (
        lambda s: (Findings("ct-lung", "1", (3, 4, 5)), s.volume, s.datasets),
        "findings shape",
    ),
    "volume not on the source positions": (
        lambda s: (lung_findings(s.volume), _shifted(s.volume, 1.0), s.datasets),
        "position",
    ),
    "source grid differs": (
        lambda s: (lung_findings(s.volume), s.volume, _edit(s, 0, Rows=41)),
        "source grid",
    ),
    "source pixel spacing differs": (
        lambda s: (lung_findings(s.volume), s.volume, _edit(s, 0, PixelSpacing=[0.9, 0.6])),
        "pixel spacing",
    ),
    "a source is missing": (
        lambda s: (lung_findings(s.volume), s.volume, s.datasets[1:]),
        "not among the datasets",
    ),
    "sources from two series": (
        lambda s: (lung_findings(s.volume), s.volume, _edit(s, 0, SeriesInstanceUID="1.2.3.4")),
        "2 series",
    ),
    "source without a study UID": (
        lambda s: (lung_findings(s.volume), s.volume, [_with(ds, StudyInstanceUID="") for ds in s.datasets]),
        "StudyInstanceUID",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(case: str, tmp_path: Path) -> None:
    series = make_series()
    make, message = BAD_INPUTS[case]
    findings, volume, datasets = make(series)
    with pytest.raises(ResultError, match=message):
        write_results(findings, volume, datasets, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labelmap_refuses_overlapping_segments(tmp_path: Path) -> None:
    series = make_series()
    findings = lung_findings(series.volume, overlap=True)
    with pytest.raises(ResultError, match="overlap"):
        write_results(
            findings,
            series.volume,
            series.datasets,
            tmp_path / "out",
            ResultOptions(segmentation_type="LABELMAP"),
        )
    assert not (tmp_path / "out").exists()


def test_series_number_collision_is_refused() -> None:
    series = make_series()
    with pytest.raises(ResultError, match="collides"):
        build_results(
            lung_findings(series.volume), series.volume, series.datasets, ResultOptions(series_number_base=3)
        )


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="segmentation_type"):
        ResultOptions(segmentation_type="FRACTIONAL")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="series_number_base"):
        ResultOptions(series_number_base=0)


# --- the synthetic chest phantom through the node's own loader --------------------------------

PHANTOM_CASES = {
    "axial": {},
    "sagittal": {"orientation": "sagittal"},
    "coronal": {"orientation": "coronal"},
    "oblique": {"orientation": "oblique"},
    "reversed": {"reverse_order": True},
    "tilted": {"gantry_tilt_deg": 15.0},
}


def _phantom_findings(truth: dict[str, np.ndarray], volume: Volume) -> Findings:
    """Lungs, trachea and emphysema (inside the right lung: overlapping) from the phantom's truth."""
    lungs = lung_findings(volume)
    structures = [("lung_right", lungs.segments[0]), ("lung_left", lungs.segments[1])]
    segments = [replace(template, mask=truth[name]) for name, template in structures]
    segments.append(Segment(3, "Emphysema", ORGAN, EMPHYSEMA, truth["emphysema"], color_rgb=(230, 60, 60)))
    measurements = [
        Measurement(VOLUME, round(float(s.mask.sum()) * volume.voxel_volume_ml, 3), ML, s.number)
        for s in segments
    ]
    return Findings("ct-lung", "1.2.0", volume.shape, tuple(segments), tuple(measurements))


@viewer_case("test_phantom_series", sorted(PHANTOM_CASES))
def _phantom(case: str, tmp: Path) -> Built:
    phantom = ct_chest_phantom(48, 48, 24, **PHANTOM_CASES[case])  # type: ignore[arg-type]
    volume = load_series(phantom.datasets)
    findings = _phantom_findings(phantom.truth, volume)
    paths = _by_kind(write_results(findings, volume, phantom.datasets, tmp / "out"))
    extra = {"phantom": phantom, "volume": volume, "findings": findings}
    return Built(paths, _save_sources(phantom.datasets, tmp / "src"), extra)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PHANTOM_CASES))
def test_phantom_series(
    case: str, viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> None:
    """Any orientation, slice order and gantry tilt: SEG frames on the planes, masks back, OHIF loads it."""
    built, viewer = _viewed(viewed, request)
    phantom, volume, findings = (built.extra[k] for k in ("phantom", "volume", "findings"))
    # the truth is indexed like the phantom's voxels: the loader must have found the same grid
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=1e-4)
    paths = built.paths
    check_frames_on_sources(pydicom.dcmread(paths["SEG"][0]), phantom.datasets)
    check_masks(paths["SEG"][0], findings, volume)
    for path in (*paths["SEG"], *paths["SR"], *paths["SC"]):
        result = require(validate.dciodvfy(path))
        assert result.ok, f"{path.name}: {result}"
    assert viewer.ok, viewer.output


@needs_testdata
def test_multiframe_source_frame_out_of_range() -> None:
    source = pydicom.dcmread(TESTDATA / "dcmqi/segmentations/23x38x3/multiframe/mf.dcm")
    volume = load_series([source])
    bad = Volume(volume.voxels, volume.affine, (*volume.sources[:-1], replace(volume.sources[-1], frame=4)))
    with pytest.raises(ResultError, match=r"needs frame 1\.\.3"):
        build_results(Findings("t", "1", volume.shape), bad, [source])


def test_headers_without_pixels_are_enough(tmp_path: Path) -> None:
    """The executor passes headers read with stop_before_pixels: pictures come from the Volume."""
    series = make_series()
    headers = [_with(ds) for ds in series.datasets]
    for ds in headers:
        del ds.PixelData
    paths = write_results(lung_findings(series.volume), series.volume, headers, tmp_path / "out")
    assert sorted(_by_kind(paths)) == ["SC", "SEG", "SR"]


@viewer_case("test_ohif_keeps_every_voxel_of_overlapping_segments")
def _overlapping(_: str, tmp: Path) -> Built:
    series = make_series("axial", shape=(12, 40, 48))
    shape = series.volume.shape
    body = np.ones(shape, bool)
    upper, lower = np.zeros(shape, bool), np.zeros(shape, bool)
    upper[3:9, 10:20, 8:18] = True
    lower[5:11, 10:20, 28:38] = True
    segments = tuple(
        Segment(number, label, ORGAN, EMPHYSEMA, mask)
        for number, (label, mask) in enumerate((("Body", body), ("Upper", upper), ("Lower", lower)), start=1)
    )
    findings = Findings("test", "1", shape, segments)
    paths = _by_kind(write_results(findings, series.volume, series.datasets, tmp / "out"))
    extra = {"findings": findings, "volume": series.volume, "with_sr": False}  # SR: no measurements
    return Built(paths, _save_sources(series.datasets, tmp / "src"), extra)


def test_ohif_keeps_every_voxel_of_overlapping_segments(
    viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> None:
    """A body around two organs at different heights: OHIF's layer packing must not drop slices.

    In the pipeline's order (organ lower down second) OHIF 3.13 loses the second organ's top slices;
    dicom_io.results orders overlapping segments so that it cannot (see seg._ohif_overlap_order).
    """
    case, result = _viewed(viewed, request)
    assert result.ok, result.output
    check_masks(case.paths["SEG"][0], case.extra["findings"], case.extra["volume"])


@viewer_case("test_ohif_shows_labelmap_segments_in_their_colours")
def _labelmap(_: str, tmp: Path) -> Built:
    series = make_series("oblique")
    options = ResultOptions(segmentation_type="LABELMAP", write_sc=False)
    paths = _by_kind(
        write_results(lung_findings(series.volume), series.volume, series.datasets, tmp / "out", options)
    )
    return Built(paths, _save_sources(series.datasets, tmp / "src"))


def test_ohif_shows_labelmap_segments_in_their_colours(
    viewed: dict[str, Built | Exception], request: pytest.FixtureRequest
) -> None:
    case, result = _viewed(viewed, request)
    seg = pydicom.dcmread(case.paths["SEG"][0], stop_before_pixels=True)
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == [1, 2] and seg.PixelPaddingValue == 0
    assert result.ok and not _unexpected(result.warnings), result.output
