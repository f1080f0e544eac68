"""One study, one answer: each pipeline runs once per study, on the series it prefers.

The study is the real LUNG1-001 chest CT with what a PACS sends beside it (tests/support/study.py):
a scout, a sharp-kernel reconstruction, a dose SR, a dose screen, and radgate's own earlier results.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from support.execute import make_config, spool_files
from support.node import NodeProcess, wait_for
from support.study import ChestStudy, chest_study

from dicom_io.selection import CT_SHARP_KERNELS, CT_SOFT_KERNELS, SeriesWanted
from plugin.cli.rules import rules_check
from plugin.config import CompletionConfig, Config, load_config
from plugin.jobs.completion import CompletionMonitor
from plugin.jobs.queue import routing_hook
from plugin.route.pipelines import series_lookup
from plugin.route.rules import plan_study, read_series, validate_rules
from plugin.route.selection import SeriesInfo, always_refused, measure, rank_series
from plugin.store.engine import Store, migrated_store
from plugin.store.models import Job, JobState, utcnow


def _ct_lung() -> SeriesWanted:
    """What ct-lung wants (its module imports torch: loaded by the tests that use it, not at collection)."""
    from ai_models.ct_lung import CtLungPipeline

    return CtLungPipeline.series


SLICES = 40  # the central 120 mm of the chest: above ct-lung's minimum (80 mm, 20 slices), and quick


@pytest.fixture(scope="module")
def study(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> ChestStudy:
    return chest_study(testdata, tmp_path_factory.mktemp("chest-study"), SLICES)


@pytest.fixture(scope="module")
def series(study: ChestStudy) -> dict[str, SeriesInfo]:
    """The study's series as `radgate rules check` reads them from disk, by SeriesInstanceUID."""
    studies, skipped = read_series([Path(study.files[0]).parents[1]])
    assert skipped == 0 and list(studies) == [study.study_uid]
    return {s.series_uid: s for s in studies[study.study_uid]}


def _variant(info: SeriesInfo, uid: str, instances: int, **attributes: Any) -> SeriesInfo:
    """Another reconstruction of the same acquisition: the header of `info` with other values."""
    header = copy.deepcopy(info.header)
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    return SeriesInfo(uid, header, instances)


def _places(ranking: tuple[Any, ...]) -> dict[str, int | None]:
    return {r.series_uid: r.place for r in ranking}


def test_ct_lung_takes_the_soft_kernel_series_and_refuses_the_rest_with_a_reason(
    study: ChestStudy, series: dict[str, SeriesInfo]
) -> None:
    ranking = rank_series(list(series.values()), _ct_lung())
    assert [r.series_uid for r in ranking if r.place is not None] == [study.soft, study.sharp]
    reasons = {r.series_uid: " ".join(r.reasons) for r in ranking}
    assert reasons[study.soft] == ""
    assert reasons[study.sharp] == "kernel 'B70f' is preferred less than 'B19f' (rank 2 vs 1 of 3)"
    assert reasons[study.scout].startswith("a localizer (scout)")
    assert reasons[study.dose_sr] == "Modality SR: not an image series"
    assert reasons[study.protocol] == "a secondary capture"
    assert len(study.results) == 3  # SEG, SR and the SC key images of the earlier run
    for uid in study.results:
        assert reasons[uid] in ("Modality SEG: not an image series", "Modality SR: not an image series",
                                "Modality OT: not an image series"), reasons[uid]  # fmt: skip


def test_the_preference_order_kernel_then_thinnest_then_coverage_then_instances_then_uid(
    study: ChestStudy, series: dict[str, SeriesInfo]
) -> None:
    soft = series[study.soft]
    thin_sharp = _variant(soft, "9.1", 120, SliceThickness=1.0, ConvolutionKernel="B70f")
    thin_soft = _variant(soft, "9.2", 80, SliceThickness=1.5, ConvolutionKernel="B30f")
    unknown = _variant(soft, "9.3", 80, SliceThickness=1.0, ConvolutionKernel="XYZ")
    short_soft = _variant(soft, "9.4", 20, SliceThickness=3.0)  # 60 mm: under ct-lung's 80
    ranking = rank_series([thin_sharp, soft, short_soft, thin_soft, unknown], _ct_lung())
    # soft/standard before sharp before a kernel ct-lung does not name; among soft ones the thinnest
    assert _places(ranking) == {"9.2": 1, study.soft: 2, "9.1": 3, "9.3": 4, "9.4": None}
    by_uid = {r.series_uid: r for r in ranking}
    assert by_uid[study.soft].reasons == ("thicker slices (3 mm vs 1.5 mm)",)
    assert by_uid["9.4"].reasons == ("covers 60 mm, needs at least 80 mm",)

    same = _variant(soft, "9.5", SLICES)  # the same series under another UID: coverage, then UID
    longer = _variant(soft, "9.6", SLICES + 10)
    assert [r.series_uid for r in rank_series([same, longer, soft], _ct_lung())] == ["9.6", study.soft, "9.5"]
    twin = rank_series([same, soft], _ct_lung())
    assert twin[1].reasons == ("equal on every criterion; the lower SeriesInstanceUID wins",)
    spaced = _variant(soft, "9.7", 30, SpacingBetweenSlices=2.0)  # 60 mm by its spacing, not thickness
    assert rank_series([spaced], _ct_lung())[0].reasons == ("covers 60 mm, needs at least 80 mm",)


def test_requirements_reject_with_every_reason(series: dict[str, SeriesInfo], study: ChestStudy) -> None:
    soft = series[study.soft]
    coronal = _variant(soft, "8.1", 300, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    thick = _variant(soft, "8.2", 40, SliceThickness=12.0)
    mr = _variant(soft, "8.3", 40, Modality="MR")
    mip = _variant(soft, "8.4", 40, ImageType=["DERIVED", "SECONDARY", "MIP"])
    ours = _variant(soft, "8.5", 40, Manufacturer="radgate", ManufacturerModelName="radgate")
    screen = _variant(soft, "8.6", 1, SeriesDescription="Dose Report", ImageType=["ORIGINAL", "PRIMARY"])
    reasons = {
        r.series_uid: r.reasons for r in rank_series([coronal, thick, mr, mip, ours, screen], _ct_lung())
    }
    assert reasons == {
        "8.1": ("coronal slices, needs axial",),
        "8.2": ("slices 12 mm thick, needs 0.5 to 10 mm",),
        "8.3": ("Modality MR, needs CT",),
        "8.4": ("not ORIGINAL\\PRIMARY: ImageType DERIVED\\SECONDARY\\MIP",),
        "8.5": ("results radgate wrote (Manufacturer and model radgate)",),
        "8.6": ("a dose report: SeriesDescription 'Dose Report'",),
    }
    # what a header does not say is not held against a series (the pipeline's own check judges)
    bare = SeriesInfo("8.7", {"Modality": "CT"}, 25)
    assert rank_series([bare], _ct_lung())[0].place == 1
    assert always_refused({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}) is None


def test_mr_brain_prefers_a_3d_t1(testdata: Path) -> None:
    [mprage] = next(iter(read_series([testdata / "mr-brain-t1-mprage"])[0].values()))
    flair = _variant(mprage, "7.1", 176, SeriesDescription="t2_flair_sag_3d", SequenceName="*spc3d1",
                     ProtocolName="t2_flair_sag")  # fmt: skip
    axial_2d = _variant(mprage, "7.2", 176, MRAcquisitionType="2D")
    from ai_models.mr_brain import MrBrainPipeline

    ranking = rank_series([flair, axial_2d, mprage], MrBrainPipeline.series)
    assert _places(ranking) == {mprage.series_uid: 1, "7.1": 2, "7.2": None}
    assert ranking[2].reasons == ("MRAcquisitionType 2D, needs 3D",)


def test_the_shipped_rules_plan_one_ct_lung_job_on_the_soft_series(
    study: ChestStudy, series: dict[str, SeriesInfo]
) -> None:
    config = load_config(None)
    rules = validate_rules(config, {"ct-lung", "mr-brain"}, series_lookup=series_lookup(config))
    plan = plan_study(list(series.values()), rules)
    assert [(j.action.pipeline, j.action.rule, j.series_uid) for j in plan.jobs] == [
        ("ct-lung", "chest-ct", study.soft)
    ]
    # a series-scope rule stays what it was: a job on every series it matches
    each = config.model_copy(update={"rules": Config.model_validate(
        {"rules": [{"name": "each-ct", "match": {"Modality": {"equals": "CT"}}, "pipeline": "ct-lung"}]}
    ).rules})  # fmt: skip
    per_series = plan_study(list(series.values()), validate_rules(each, {"ct-lung"}))
    assert {j.series_uid for j in per_series.jobs} == {study.soft, study.sharp, study.scout, study.protocol}


def test_rules_check_shows_the_ranking_and_why_each_other_series_lost(
    study: ChestStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(None)
    folder = Path(study.files[0]).parents[1]
    assert rules_check(config, [folder], {"ct-lung", "mr-brain"}, series_lookup=series_lookup(config)) == 0
    text = capsys.readouterr().out
    assert "  ct-lung (rule chest-ct) ranks the series it won:\n" in text
    assert f"    1. series {study.soft}: chosen\n" in text
    assert f"    2. series {study.sharp}: lost: kernel 'B70f' is preferred less than 'B19f'" in text
    assert f"    -  series {study.scout}: rejected: a localizer (scout)" in text
    assert f"    -  series {study.protocol}: rejected: a secondary capture" in text
    [job_line] = [line for line in text.splitlines() if line.startswith("  job:")]
    assert job_line.startswith(f"  job: ct-lung on series {study.soft} (rule chest-ct, study scope)")
    assert "LUNG1" not in text  # no patient data


def test_the_orthanc_plugin_reads_declarations_without_importing_torch() -> None:
    """Inside Orthanc no pipeline is imported; the declarations are the pipelines' own all the same."""
    code = (
        "import json, sys, dataclasses\n"
        "from plugin.config import load_config\n"
        "from plugin.route.pipelines import series_lookup\n"
        "lookup = series_lookup(load_config(None), import_pipelines=False)\n"
        "wanted = {n: dataclasses.asdict(lookup(n)) for n in ('ct-lung', 'mr-brain')}\n"
        "try:\n"
        "    lookup('nope')\n"
        "except LookupError as err:\n"
        "    wanted['error'] = str(err)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, **wanted}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout)
    assert answer["torch"] is False
    from ai_models.ct_lung import CtLungPipeline
    from ai_models.mr_brain import MrBrainPipeline

    for name, pipeline in (("ct-lung", CtLungPipeline), ("mr-brain", MrBrainPipeline)):
        assert answer[name] == json.loads(json.dumps(dataclasses.asdict(pipeline.series))), name
    assert "no pipeline named 'nope'" in answer["error"]


def test_the_kernel_classes_name_vendor_kernels() -> None:
    wanted = SeriesWanted(kernels=(CT_SOFT_KERNELS, CT_SHARP_KERNELS))
    for kernel, rank in [("B19f", 0), ("Br40", 0), ("STANDARD", 0), ("SOFT", 0), ("FC03", 0), ("B", 0),
                         ("B70f", 1), ("Bl57", 1), ("LUNG", 1), ("BONEPLUS", 1), ("YB", 1), ("L", 1),
                         ("FC51", 1), ("XYZ", 2)]:  # fmt: skip
        info = SeriesInfo("1", {"Modality": "CT", "ConvolutionKernel": [kernel, "3"]}, 1)
        [ranked] = rank_series([info], wanted)
        assert not ranked.reasons
        assert measure("1", info.header, 1, wanted).kernel_rank == rank, kernel


# --- later revisions -----------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[tuple[Store, Config]]:
    config = make_config(tmp_path / "data")
    with migrated_store(config.db_url) as s:
        yield s, config


def _complete(store: Store, config: Config) -> None:
    default = load_config(None).model_copy(update={"data_dir": config.data_dir})
    rules = validate_rules(default, {"ct-lung"}, series_lookup=series_lookup(default))
    monitor = CompletionMonitor(
        store, CompletionConfig(quiet_period_s=1), on_complete=routing_hook(rules, config.spool_dir)
    )
    monitor.check(utcnow() + timedelta(seconds=5))


def _jobs(store: Store) -> list[tuple[int, str | None, str]]:
    with store.session() as s:
        return [(j.study_revision, j.series_uid, j.state) for j in s.scalars(select(Job).order_by(Job.id))]


def _files(study: ChestStudy, folder: str) -> list[Path]:
    return [f for f in study.files if f.parent.name == folder]


def test_a_later_revision_runs_again_only_when_the_chosen_series_changes(
    study: ChestStudy, store: tuple[Store, Config], caplog: pytest.LogCaptureFixture
) -> None:
    db, config = store
    spool_files(db, config, [*_files(study, "sharp"), *_files(study, "scout"), *_files(study, "dose")])
    _complete(db, config)
    assert _jobs(db) == [(1, study.sharp, JobState.QUEUED)]  # the only series ct-lung can use

    spool_files(db, config, _files(study, "soft"))  # the soft reconstruction arrives later
    _complete(db, config)
    assert _jobs(db) == [(1, study.sharp, JobState.CANCELLED), (2, study.soft, JobState.QUEUED)]

    with caplog.at_level(logging.INFO, logger="plugin.jobs.queue"):
        spool_files(db, config, _files(study, "results"))  # our earlier results come back
        _complete(db, config)
    assert len(_jobs(db)) == 2
    assert any(f"on series {study.soft} not re-run: unchanged since revision 2" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# --- the whole study sent to a running node -----------------------------------------------------


def _ended(node: NodeProcess) -> list[dict[str, Any]]:
    jobs = node.jobs(cli=False)
    return jobs if jobs and all(j["state"] in ("SUCCEEDED", "FAILED") for j in jobs) else []


@pytest.mark.slow  # ct-lung on 40 real 512x512 slices in a worker process
def test_a_node_runs_one_job_on_a_whole_chest_ct_study_and_writes_one_result_set(
    study: ChestStudy, tmp_path: Path
) -> None:
    node = NodeProcess(tmp_path).start()  # the shipped rules
    try:
        sent = node.storescu(*study.files, options=("--required",))  # SEG and dose SR contexts too
        assert sent.returncode == 0, sent.stderr
        [job] = wait_for(lambda: _ended(node), 300, "the study's job to end", interval=0.5)
        [record] = node.studies(cli=False)
    finally:
        assert node.stop() == 0, node.log()
    assert (record["study_uid"], record["instance_count"]) == (study.study_uid, len(study.files))
    assert (job["series_uid"], job["pipeline"], job["rule"]) == (study.soft, "ct-lung", "chest-ct")
    assert (job["state"], job["error"]) == ("SUCCEEDED", None)
    kinds = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).Modality)
                   for f in Path(job["results_dir"]).glob("*.dcm"))  # fmt: skip
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and set(kinds) == {"SEG", "SR", "OT"}, kinds
    log = node.log()
    assert f"rule chest-ct: ct-lung prefers series {study.soft}" in log
    assert f"series {study.scout}: rejected: a localizer" in log and f"series {study.sharp}: lost" in log


def test_headers_a_peer_got_wrong_never_break_the_ranking() -> None:
    ct = {"Modality": "CT"}
    odd = [
        SeriesInfo("6.1", {**ct, "NumberOfFrames": "nan", "SliceThickness": "abc"}, 30),
        SeriesInfo("6.2", {**ct, "NumberOfFrames": "1e400", "ImageOrientationPatient": [1, 0]}, 1),
        SeriesInfo("6.3", {**ct, "SliceThickness": "-3", "ImageOrientationPatient": [0] * 6}, 25),
        SeriesInfo("6.4", {"Modality": "ct ", "ConvolutionKernel": ["", "B30f"], "SliceThickness": "i"}, 25),
    ]
    ranking = rank_series(odd, _ct_lung())
    assert _places(ranking) == {"6.4": 1, "6.1": 2, "6.3": 3, "6.2": None}
    with pytest.raises(ValueError, match="invalid pattern"):
        SeriesWanted(kernels=("B[",))
