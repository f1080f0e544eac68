"""De-identified exports on a real CT: PS3.15 Table E.1-1 on every attribute, references, pseudonyms.

Six slices of the NSCLC chest CT (shared test data) and the SEG, SR and SC key images radgate
builds from them go through the de-identification step the dispatcher runs before a sender
(`plugin.dispatch.deidentify.prepare`, pseudonyms in a real SQLite job store), and once end to end
through the dispatcher into a real Orthanc. The expected action for each attribute is read from
the same Table E.1-1 data (dicom-anonymizer), and checked against the original's value.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from sqlalchemy import select
from support.execute import make_job
from support.results import load_real, lung_findings, require
from support.testdata import require_path

from dicom_io.deidentify import table_action
from dicom_io.results import ResultOptions, write_results
from dicom_io.testing import validate
from dicom_io.testing.orthanc_server import OrthancServer, wait_until
from plugin.config import Deidentify, load_config
from plugin.dispatch.base import Outgoing
from plugin.dispatch.deidentify import Prepared, prepare
from plugin.dispatch.outbox import Dispatcher, enqueue_deliveries
from plugin.dispatch.pseudonyms import KEY_FILE, StorePseudonyms, load_key
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, Pseudonym

SLICES = slice(60, 66)
_WRITTEN = {"PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"}


@dataclass(frozen=True)
class Case:
    sources: list[Path]  # the CT slices, as in the spool
    results: list[Path]  # SEG, SR, SC written by radgate
    results_dir: Path
    store: Store
    key: bytes
    work: Path


@pytest.fixture(scope="module")
def case(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    root = tmp_path_factory.mktemp("deid")
    chest = require_path(testdata / "ct-chest-nsclc-lung1-001" / "ct")
    spool = root / "spool"
    spool.mkdir()
    for path in sorted(chest.iterdir(), key=lambda p: int(p.stem))[SLICES]:
        shutil.copy(path, spool / path.name)
    datasets, volume = load_real(spool)
    results_dir = root / "results"
    results = write_results(lung_findings(volume), volume, datasets, results_dir / "1", ResultOptions())
    store = Store(f"sqlite:///{root / 'radgate.db'}")
    store.migrate()
    (root / "work").mkdir()
    yield Case(sorted(spool.iterdir()), results, results_dir, store, load_key(root), root / "work")
    store.dispose()


def _items(paths: list[Path], start: int = 1) -> list[Outgoing]:
    return [Outgoing(start + n, f"uid-{n}", path) for n, path in enumerate(paths)]


def _run(case: Case, settings: Deidentify, paths: list[Path], domain: str, into: str) -> Prepared:
    out = case.work / into
    out.mkdir()
    names = StorePseudonyms(case.store, case.key, domain)
    return prepare(_items(paths), settings, names, case.results_dir, out)


@pytest.fixture(scope="module")
def basic(case: Case) -> tuple[dict[Path, Dataset], dict[Path, Dataset]]:
    """Sources and results (but the report card) through the Basic Profile alone: {original: output}."""
    from dicom_io.results.common import REPORT_CARD

    card = [p for p in case.results if pydicom.dcmread(p).get("ImageComments") == REPORT_CARD]
    paths = case.sources + [p for p in case.results if p not in card]
    prepared = _run(case, Deidentify(), paths, "research", "basic")
    assert not prepared.failed and not prepared.refused
    outputs = {paths[item.delivery_id - 1]: pydicom.dcmread(item.path) for item in prepared.items}
    return {p: pydicom.dcmread(p) for p in paths}, outputs


def _values(value: object) -> list[str]:
    if isinstance(value, MultiValue | list):
        return [str(v) for v in value]
    return [] if value in (None, "") else [str(value)]


def _replaced(before: list[str], now: list[str]) -> bool:
    return len(now) == len(before) and all(UID(v).is_valid and v not in before for v in now)


def _check_table(original: Dataset, output: Dataset, where: str, problems: list[str]) -> None:
    """Every attribute of ``original`` that Table E.1-1 lists, against its action, in ``output``."""
    for elem in original:
        tag, name = elem.tag, f"{where}{elem.keyword or elem.tag}"
        if tag.is_private:
            if tag in output:
                problems.append(f"{name}: private attribute kept")
            continue
        if elem.keyword in _WRITTEN:
            continue  # written by the de-identification itself
        code = table_action(tag)
        after = output.get(tag)
        if code is None:
            if elem.VR == "SQ" and after is not None:
                for n, (item, out_item) in enumerate(zip(elem.value, after.value, strict=True)):
                    _check_table(item, out_item, f"{name}[{n}].", problems)
            continue
        if elem.keyword in ("PatientID", "PatientName"):
            if after is None or str(after.value) == str(elem.value) or not str(after.value).startswith("RG"):
                problems.append(f"{name}: not the pseudonym")
            continue
        before = _values(elem.value) if elem.VR != "SQ" else []
        now = [] if after is None or elem.VR == "SQ" else _values(after.value)
        if code == "X" and after is not None:
            problems.append(f"{name}: X but present")
        elif code in ("Z", "X/Z") and now:
            problems.append(f"{name}: {code} but has a value")
        elif code in ("D", "Z/D", "X/D", "X/Z/D") and before and now == before:
            problems.append(f"{name}: {code} but keeps its value")
        elif code == "D" and elem.VR != "SQ" and not now:
            problems.append(f"{name}: D but empty")
        elif code in ("U", "X/Z/U*") and elem.VR == "UI" and not _replaced(before, now):
            problems.append(f"{name}: U but {now} for {before}")
        if elem.VR == "SQ" and after is not None and code != "X":
            for n, (item, out_item) in enumerate(zip(elem.value, after.value, strict=False)):
                _check_table(item, out_item, f"{name}[{n}].", problems)


def test_every_table_e1_attribute_follows_its_action(
    basic: tuple[dict[Path, Dataset], dict[Path, Dataset]],
) -> None:
    originals, outputs = basic
    problems: list[str] = []
    codes: set[str | None] = set()
    for path, original in originals.items():
        _check_table(original, outputs[path], f"{path.name}: ", problems)
        codes |= {table_action(e.tag) for e in original.iterall()}
    assert not problems, "\n".join(problems)
    assert codes >= {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D"}  # every kind of action was met
    for out in outputs.values():
        assert out.PatientIdentityRemoved == "YES"
        assert out.LongitudinalTemporalInformationModified == "REMOVED"
        assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        text = str(out)
        for phi in ("LUNG1-001", "2819497684894126"):
            assert phi not in text


def test_outputs_are_dciodvfy_clean(
    basic: tuple[dict[Path, Dataset], dict[Path, Dataset]], case: Case
) -> None:
    _, outputs = basic
    kinds = {}
    for path, out in outputs.items():
        kinds.setdefault(str(out.Modality), path)
    assert set(kinds) >= {"CT", "SEG", "SR", "OT"}
    for modality, path in kinds.items():
        written = case.work / f"check-{modality}.dcm"
        outputs[path].save_as(written, enforce_file_format=True)
        result = require(validate.dciodvfy(written))
        assert result.ok, f"{modality}: {result}"


def test_references_point_at_the_deidentified_ct(
    basic: tuple[dict[Path, Dataset], dict[Path, Dataset]],
) -> None:
    _, outputs = basic
    ct = [ds for ds in outputs.values() if ds.Modality == "CT"]
    seg = next(ds for ds in outputs.values() if ds.Modality == "SEG")
    sr = next(ds for ds in outputs.values() if ds.Modality == "SR")
    ct_uids = {str(ds.SOPInstanceUID) for ds in ct}
    assert len(ct_uids) == 6
    assert len({str(ds.SeriesInstanceUID) for ds in ct}) == 1
    for derived in (seg, sr):
        assert derived.StudyInstanceUID == ct[0].StudyInstanceUID
        assert derived.PatientID == ct[0].PatientID
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence} == ct_uids
    sources = {
        str(src.ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for src in derivation.SourceImageSequence
    }
    assert sources and sources <= ct_uids
    referenced = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert referenced & ct_uids and str(seg.SOPInstanceUID) in referenced
    assert referenced <= ct_uids | {str(seg.SOPInstanceUID)}


def test_same_patient_same_pseudonym_across_sends_and_not_across_domains(case: Case) -> None:
    first = _run(case, Deidentify(), case.sources[:2], "site-a", "a1")
    again = _run(case, Deidentify(), case.sources[:2], "site-a", "a2")
    other = _run(case, Deidentify(), case.sources[:2], "site-b", "b1")

    def ids(prepared: Prepared) -> list[tuple[str, str, str]]:
        read = [pydicom.dcmread(item.path) for item in prepared.items]
        return [(str(d.PatientID), str(d.StudyInstanceUID), str(d.SOPInstanceUID)) for d in read]

    assert ids(first) == ids(again)
    assert {i[0] for i in ids(first)} == {ids(first)[0][0]}
    assert not {v for i in ids(other) for v in i} & {v for i in ids(first) for v in i}
    with case.store.session() as s:
        stored = list(s.scalars(select(Pseudonym).where(Pseudonym.domain == "site-a")))
    assert stored and all(len(p.original_hash) == 64 for p in stored)
    originals = {str(pydicom.dcmread(p).SOPInstanceUID) for p in case.sources[:2]} | {"LUNG1-001"}
    assert not {p.original_hash for p in stored} & originals  # hashes only, never the values
    assert (case.work.parent / KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_options_keep_what_they_name(case: Case) -> None:
    settings = Deidentify(
        retain_longitudinal_temporal=True, retain_patient_characteristics=True, clean_descriptors=True
    )
    original = pydicom.dcmread(case.sources[0])
    out = pydicom.dcmread(_run(case, settings, case.sources[:1], "options", "opt").items[0].path)
    assert out.StudyDate == original.StudyDate and out.AcquisitionTime == original.AcquisitionTime
    assert out.PatientSex == original.PatientSex
    # the real description starts with the patient ID: cut out, the rest kept
    assert out.StudyDescription == original.StudyDescription.replace("LUNG1-001", "") != ""
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    codes = [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113106", "113108"]
    assert (
        "PatientBirthDate" not in out
        or not out.PatientBirthDate
        or out.PatientBirthDate == original.PatientBirthDate
    )


def test_clean_descriptors_cuts_patient_identifiers(case: Case) -> None:
    source = pydicom.dcmread(case.sources[0])
    source.SeriesDescription = "CT chest LUNG1-001 follow-up"
    path = case.work / "described.dcm"
    source.save_as(path, enforce_file_format=True)
    out = pydicom.dcmread(
        _run(case, Deidentify(clean_descriptors=True), [path], "clean", "clean").items[0].path
    )
    assert "LUNG1-001" not in out.SeriesDescription and "follow-up" in out.SeriesDescription


def test_burned_in_annotation_is_refused_unless_allowed(case: Case) -> None:
    from dicom_io.results.common import REPORT_CARD

    source = pydicom.dcmread(case.sources[0])
    source.BurnedInAnnotation = "YES"
    path = case.work / "burned.dcm"
    source.save_as(path, enforce_file_format=True)
    key_images = [
        p for p in case.results if pydicom.dcmread(p).get("ImageComments", "").startswith("Key image")
    ]
    card = next(p for p in case.results if pydicom.dcmread(p).get("ImageComments") == REPORT_CARD)
    assert key_images and all(pydicom.dcmread(p).BurnedInAnnotation == "YES" for p in [*key_images, card])

    refused = _run(case, Deidentify(), [path, *key_images, card], "burned", "burned")
    assert set(refused.refused) == {1, len(key_images) + 2}
    assert "BurnedInAnnotation YES" in refused.refused[1]
    assert "date" in refused.refused[len(key_images) + 2]
    assert len(refused.items) == len(key_images)  # radgate's key images name no patient

    dated = _run(case, Deidentify(retain_longitudinal_temporal=True), [card], "burned", "dated")
    allowed = _run(case, Deidentify(allow_burned_in=True), [path], "burned", "allowed")
    assert len(dated.items) == 1 and len(allowed.items) == 1


@pytest.mark.parametrize("kind", ["orthanc", "dicom", "dicomweb"])
def test_dispatcher_sends_deidentified_seg_and_ct_to_orthanc(
    case: Case, orthanc: OrthancServer, tmp_path: Path, kind: str
) -> None:
    """The same step before each sender kind: REST, C-STORE, STOW-RS into a real Orthanc."""
    if kind == "dicomweb" and not orthanc.dicomweb:
        pytest.skip("Orthanc's DICOMweb plugin is not installed")
    burned = pydicom.dcmread(case.sources[0])
    burned.BurnedInAnnotation = "YES"
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    burned_path = tmp_path / "burned.dcm"
    burned.save_as(burned_path, enforce_file_format=True)
    config_path = tmp_path / "radgate.yaml"
    peers = {
        "orthanc": {"kind": "orthanc", "url": orthanc.url},
        "dicom": {"kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": "ORTHANC"},
        "dicomweb": {"kind": "dicomweb", "url": orthanc.dicomweb_url},
    }
    destination = {**peers[kind], "deidentify": {"include_source": True}}
    data = {
        "data_dir": str(tmp_path / "data"),
        "executor": {"results_dir": str(case.results_dir)},
        "destinations": {"research": destination},
        "dispatch": {"retry_base_s": 0.01, "retry_max_s": 0.05, "retry_jitter": 0.0},
    }
    config_path.write_text(yaml.safe_dump(data))
    config = load_config(config_path)
    (tmp_path / "data").mkdir()
    store = Store(f"sqlite:///{tmp_path / 'data' / 'radgate.db'}")
    store.migrate()
    try:
        job_id = make_job(store, study_uid="1.2.3.4.5", pipeline="ct-lung")
        seg = next(p for p in case.results if p.name.startswith("SEG-"))
        sources = [(str(pydicom.dcmread(p).SOPInstanceUID), p) for p in case.sources]
        with store.session() as s:
            enqueue_deliveries(
                s, job_id, [(seg.stem, seg), *sources, ("1.2.3.4.5.6.7", burned_path)], ["research"]
            )
        outgoing = tmp_path / "data" / "outgoing"
        stale, fresh = outgoing / "deid-stale", outgoing / "deid-fresh"
        for folder in (stale, fresh):
            folder.mkdir(parents=True)
            (folder / "1.dcm").write_bytes(b"left by a dispatcher that was killed")
        os.utime(stale, (0, 0))
        dispatcher = Dispatcher(store, config, seed=1)

        def settled() -> bool:
            with store.session() as s:
                return not set(s.scalars(select(Delivery.state))) & {
                    DeliveryState.PENDING,
                    DeliveryState.SENDING,
                }

        dispatcher.start()
        try:
            wait_until(settled, 30.0, "every delivery SENT or DEAD", interval=0.02)
        finally:
            dispatcher.stop()
        with store.session() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(Delivery))}
        dead = rows.pop("1.2.3.4.5.6.7")
        assert dead.state == DeliveryState.DEAD and dead.attempts == 1
        assert "BurnedInAnnotation YES" in (dead.last_error or "")
        assert {r.state for r in rows.values()} == {DeliveryState.SENT}
    finally:
        store.dispose()

    studies = orthanc.studies()
    assert len(studies) == 1
    instances = orthanc.instances_of_study(studies[0]["MainDicomTags"]["StudyInstanceUID"])
    stored = [pydicom.dcmread(io.BytesIO(orthanc.instance_file(i["ID"]))) for i in instances]
    assert sorted(str(ds.Modality) for ds in stored) == ["CT"] * 6 + ["SEG"]
    assert all(ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("RG") for ds in stored)
    original_uids = {uid for uid, _ in sources} | {"1.2.3.4.5"}
    assert not {str(ds.SOPInstanceUID) for ds in stored} & original_uids
    seg_out = next(ds for ds in stored if ds.Modality == "SEG")
    ct_uids = {str(ds.SOPInstanceUID) for ds in stored if ds.Modality == "CT"}
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for i in seg_out.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == ct_uids
    assert list(outgoing.iterdir()) == [fresh]  # each send's copies went, and a killed one's stale ones
