"""Routing rules: matchers, order, defaults, load-time errors, study plans and `radgate rules check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from plugin.cli import main
from plugin.config import Config, ConfigError, OrthancDestination, load_config
from plugin.route.rules import RuleSet, SeriesInfo, plan_study, route_series, validate_rules

PIPELINES = {"ct-lung", "mr-brain", "other"}
PATIENT_NAME = "Secret^Patient"
RADGATE = Path(sys.executable).parent / "radgate"


def _config(tmp_path: Path, data: dict[str, Any]) -> Config:
    path = tmp_path / "radgate.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_config(path)


def _rule(name: str, match: dict[str, Any], pipeline: str = "ct-lung", **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "pipeline": pipeline, **extra}


def _rules(tmp_path: Path, *rules: dict[str, Any], **config: Any) -> RuleSet:
    return validate_rules(_config(tmp_path, {"rules": list(rules), **config}), PIPELINES)


@pytest.mark.parametrize(
    ("keyword", "matcher", "value", "holds"),
    [
        ("Modality", {"equals": "CT"}, "CT", True),
        ("Modality", {"equals": "CT"}, "MR", False),
        ("Modality", {"equals": "ct"}, "CT", False),
        ("Modality", {"equals": "ct", "ignore_case": True}, "CT", True),
        ("SliceThickness", {"equals": 1}, "1.0", True),
        ("SliceThickness", {"equals": 1}, 1.25, False),
        ("Modality", {"one_of": ["CT", "MR"]}, "MR", True),
        ("Modality", {"one_of": ["CT", "MR"]}, "PT", False),
        ("SeriesDescription", {"regex": "^AX"}, "AXIAL T2", True),
        ("SeriesDescription", {"regex": "^AX"}, "ax t2", False),
        ("SeriesDescription", {"regex": "^AX", "ignore_case": True}, "ax t2", True),
        ("ImageType", {"regex": "^LOCALIZER$"}, ["ORIGINAL", "PRIMARY", "LOCALIZER"], True),
        ("ImageType", {"regex": "^LOCALIZER$"}, ["ORIGINAL", "PRIMARY", "AXIAL"], False),
        ("SliceThickness", {"range": {"min": 0.5, "max": 2}}, 1.0, True),
        ("SliceThickness", {"range": {"min": 0.5, "max": 2}}, 3, False),
        ("SliceThickness", {"range": {"max": 2}}, "0.625", True),
        ("SliceThickness", {"range": {"max": 2}}, "thin", False),
        ("BodyPartExamined", {"present": True}, "CHEST", True),
        ("BodyPartExamined", {"present": True}, "", False),
        ("BodyPartExamined", {"present": True}, None, False),
        ("BodyPartExamined", {"absent": True}, None, True),
        ("BodyPartExamined", {"absent": True}, "CHEST", False),
    ],
)
def test_matcher(tmp_path: Path, keyword: str, matcher: dict[str, Any], value: Any, holds: bool) -> None:
    rules = _rules(tmp_path, _rule("r", {keyword: matcher}))
    header = {} if value is None else {keyword: value}
    decision = route_series(header, rules)
    assert decision.rule == ("r" if holds else None)
    if not holds:
        (outcome,) = decision.not_matched
        assert outcome.rule == "r"
        (reason,) = outcome.reasons
        assert reason.startswith(f"{keyword}: wanted ")
        shown = "absent" if value in (None, "") else str(value[-1] if isinstance(value, list) else value)
        assert shown in reason


def test_dataset_header_and_multivalue(tmp_path: Path) -> None:
    rules = _rules(
        tmp_path, _rule("loc", {"ImageType": {"equals": "LOCALIZER"}, "Modality": {"equals": "CT"}})
    )
    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert route_series(ds, rules).rule == "loc"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert route_series(ds, rules).rule is None


def test_first_match_wins_and_earlier_misses_are_explained(tmp_path: Path) -> None:
    mr = _rule("mr", {"Modality": {"equals": "MR"}}, "mr-brain")
    ct = _rule("any-ct", {"Modality": {"equals": "CT"}}, "other")
    thin = _rule("thin-ct", {"Modality": {"equals": "CT"}, "SliceThickness": {"range": {"max": 1.5}}})
    header = {"Modality": "CT", "SliceThickness": 1.0}
    decision = route_series(header, _rules(tmp_path, mr, ct, thin))
    assert (decision.rule, decision.pipeline) == ("any-ct", "other")
    assert [(o.rule, o.reasons) for o in decision.not_matched] == [
        ("mr", ("Modality: wanted equals 'MR', got 'CT'",))
    ]
    assert route_series(header, _rules(tmp_path, thin, ct)).rule == "thin-ct"


def test_disabled_rule_is_skipped_and_its_pipeline_not_checked(tmp_path: Path) -> None:
    off = _rule("off", {"Modality": {"equals": "CT"}}, "not-installed", enabled=False)
    on = _rule("on", {"Modality": {"equals": "CT"}})
    decision = route_series({"Modality": "CT"}, _rules(tmp_path, off, on))
    assert decision.rule == "on"
    assert decision.not_matched[0].reasons == ("disabled",)


def test_any_of_is_or_and_match_is_and(tmp_path: Path) -> None:
    rule = _rule(
        "chest",
        {"Modality": {"equals": "CT"}},
        any_of=[{"BodyPartExamined": {"equals": "CHEST"}}, {"StudyDescription": {"regex": "thorax"}}],
    )
    rules = _rules(tmp_path, rule)
    assert route_series({"Modality": "CT", "StudyDescription": "ct thorax"}, rules).rule == "chest"
    assert route_series({"Modality": "MR", "BodyPartExamined": "CHEST"}, rules).rule is None
    reasons = route_series({"Modality": "CT", "BodyPartExamined": "HEAD"}, rules).not_matched[0].reasons
    assert reasons == (
        "any_of[1] BodyPartExamined: wanted equals 'CHEST', got 'HEAD'",
        "any_of[2] StudyDescription: wanted regex 'thorax', got absent",
    )


def test_default_rules_route_chest_ct_and_brain_mr_only() -> None:
    rules = validate_rules(load_config(None), {"ct-lung", "mr-brain"})
    assert [r.name for r in rules.rules] == ["chest-ct", "brain-mr"]
    assert route_series({"Modality": "CT", "BodyPartExamined": "CHEST"}, rules).pipeline == "ct-lung"
    assert route_series({"Modality": "CT", "StudyDescription": "CT Thx native"}, rules).pipeline == "ct-lung"
    abdomen = {"Modality": "CT", "BodyPartExamined": "ABDOMEN", "SeriesDescription": "CT Body 3.0"}
    assert route_series(abdomen, rules).action is None
    mprage = {"Modality": "MR", "SeriesDescription": "t1_MPRAGEcr_noGRAPPA"}
    assert route_series(mprage, rules).pipeline == "mr-brain"
    assert route_series({"Modality": "MR", "BodyPartExamined": "KNEE"}, rules).action is None


def test_default_rule_without_its_pipeline_is_left_out_with_a_note() -> None:
    rules = validate_rules(load_config(None), {"ct-lung"})
    assert [r.name for r in rules.rules] == ["chest-ct"]
    assert rules.notes == ("default rule brain-mr left out: pipeline 'mr-brain' is not installed",)


DESTINATIONS = {
    "pacs": {"kind": "dicom", "host": "pacs.local", "port": 104, "ae_title": "PACS"},
    "web": {
        "kind": "dicomweb",
        "url": "https://pacs.local/dicom-web",
        "auth": {"type": "bearer", "token": "t"},
    },
    "orthanc": {"kind": "orthanc", "url": "http://orthanc:8042", "username": "u", "password": "p"},
}


def test_destinations_default_to_all_and_empty_keeps_locally(tmp_path: Path) -> None:
    everywhere = _rule("everywhere", {"Modality": {"equals": "CT"}})
    local = _rule("local", {"Modality": {"equals": "MR"}}, destinations=[])
    some = _rule("some", {"Modality": {"equals": "PT"}}, destinations=["web"])
    config = _config(tmp_path, {"destinations": DESTINATIONS, "rules": [everywhere, local, some]})
    rules = validate_rules(config, PIPELINES)
    assert route_series({"Modality": "CT"}, rules).destinations == ("pacs", "web", "orthanc")
    assert route_series({"Modality": "MR"}, rules).destinations == ()
    assert route_series({"Modality": "PT"}, rules).destinations == ("web",)
    override = validate_rules(config, PIPELINES, destinations=["orthanc"])
    assert route_series({"Modality": "MR"}, override).destinations == ("orthanc",)
    with pytest.raises(ConfigError, match="destination override 'nope' is not configured"):
        validate_rules(config, PIPELINES, destinations=["nope"])
    orthanc = config.destinations["orthanc"]
    assert isinstance(orthanc, OrthancDestination) and orthanc.password is not None
    assert orthanc.password.get_secret_value() == "p"
    assert "'p'" not in repr(config)
    assert config.with_overrides(**{"dicom.port": 104}).destinations == config.destinations


def test_default_rule_takes_unmatched_series(tmp_path: Path) -> None:
    rules = _rules(tmp_path, _rule("ct", {"Modality": {"equals": "CT"}}), default_rule={"pipeline": "other"})
    decision = route_series({"Modality": "US"}, rules)
    assert (decision.rule, decision.pipeline) == ("default_rule", "other")
    assert decision.not_matched[0].rule == "ct"


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (
            {"rules": [_rule("chest", {"Modality": {"equals": "CT"}}, destinations=["pacs", "nope"])]},
            "rules: Value error, rule 'chest' destinations: unknown destination 'nope'",
        ),
        ({"default_rule": {"pipeline": "other", "destinations": ["nope"]}}, "default_rule destinations"),
        (
            {"rules": [_rule("chest", {"SeriesDescription": {"regex": "(chest"}})]},
            "rules.0.match.SeriesDescription: Value error, invalid regex '(chest'",
        ),
        (
            {"rules": [_rule("chest", {"Modalty": {"equals": "CT"}})]},
            "rule 'chest': unknown DICOM keyword 'Modalty' (did you mean Modality?)",
        ),
        (
            {
                "rules": [
                    _rule("a", {"Modality": {"equals": "CT"}}),
                    _rule("a", {"Modality": {"equals": "MR"}}),
                ]
            },
            "rule name 'a' is used twice",
        ),
        ({"rules": [_rule("chest", {})]}, "rule 'chest' has no matcher"),
        ({"rules": [_rule("chest", {"Modality": {"equals": "CT", "regex": "C"}})]}, "exactly one of"),
        ({"rules": [_rule("seq", {"ReferencedImageSequence": {"present": True}})]}, "is a sequence"),
        ({"destinations": {"x": {"kind": "dicomweb", "url": "ftp://x"}}}, "destinations.x.dicomweb.url"),
    ],
)
def test_bad_rules_fail_at_load_naming_the_key(tmp_path: Path, config: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, {"destinations": {"pacs": DESTINATIONS["pacs"]}, **config})
    assert named in str(err.value)


def test_unknown_pipeline_fails_validation_naming_the_rule(tmp_path: Path) -> None:
    config = _config(tmp_path, {"rules": [_rule("lungs", {"Modality": {"equals": "CT"}}, "ct-lungz")]})
    with pytest.raises(ConfigError, match="rule 'lungs': unknown pipeline 'ct-lungz'"):
        validate_rules(config, PIPELINES)
    config = _config(tmp_path, {"rules": [], "default_rule": {"pipeline": "gone"}})
    with pytest.raises(ConfigError, match="rule 'default_rule': unknown pipeline 'gone'"):
        validate_rules(config, PIPELINES)


def test_a_rule_may_name_a_configured_pipeline_whose_kind_is_installed(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    label = {"label": "Bone", "category": ["123037004", "SCT", "Anat"], "type": ["272673000", "SCT", "Bone"]}
    config = _config(
        tmp_path,
        {
            "pipelines": {"bones": {"kind": "monai-bundle", "bundle_dir": str(bundle), "labels": {1: label}}},
            "rules": [_rule("ct", {"Modality": {"equals": "CT"}}, "bones")],
        },
    )
    rules = validate_rules(config, {*PIPELINES, "monai-bundle"})
    assert route_series({"Modality": "CT"}, rules).pipeline == "bones"
    with pytest.raises(ConfigError, match=r"rule 'ct': unknown pipeline 'bones' \(installed: ct-lung, mr"):
        validate_rules(config, PIPELINES)  # monai-bundle itself is not installed here


def test_identifying_values_are_never_shown(tmp_path: Path) -> None:
    rules = _rules(
        tmp_path,
        _rule("who", {"PatientName": {"equals": "Someone^Else"}}),
        _rule("when", {"PatientBirthDate": {"equals": "19000101"}}),
        _rule("where", {"PatientPosition": {"equals": "FFS"}}),
    )
    header = {"PatientName": PATIENT_NAME, "PatientBirthDate": "19700101", "PatientPosition": "HFS"}
    reasons = " ".join(r for o in route_series(header, rules).not_matched for r in o.reasons)
    assert "Secret" not in reasons and "1970" not in reasons
    assert "'HFS'" in reasons


def test_study_scope_runs_once_on_the_largest_series(tmp_path: Path) -> None:
    study = _rule("study-ct", {"Modality": {"equals": "CT"}}, "other", scope="study")
    series = _rule("each-mr", {"Modality": {"equals": "MR"}}, "mr-brain")
    rules = _rules(tmp_path, study, series)
    plan = plan_study(
        [
            SeriesInfo("1.1", {"Modality": "CT"}, 40),
            SeriesInfo("1.2", {"Modality": "CT"}, 300),
            SeriesInfo("1.3", {"Modality": "MR"}, 20),
            SeriesInfo("1.4", {"Modality": "MR"}, 20),
            SeriesInfo("1.5", {"Modality": "SR"}, 1),
        ],
        rules,
    )
    assert [(j.action.rule, j.series_uid) for j in plan.jobs] == [
        ("each-mr", "1.3"),
        ("each-mr", "1.4"),
        ("study-ct", "1.2"),
    ]
    assert plan.decisions["1.5"].action is None


def _write_series(folder: Path, study_uid: str, modality: str, description: str, body_part: str) -> str:
    """Two 16x16 slices with a patient name that must never reach any output."""
    series_uid = generate_uid()
    folder.mkdir(parents=True)
    for i in range(2):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName = PATIENT_NAME
        ds.PatientID = "SECRET-ID-42"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.BodyPartExamined = body_part
        ds.SeriesNumber = 2 if body_part == "ABDOMEN" else 1
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    return series_uid


@pytest.fixture
def study_on_disk(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """A config with one destination and a folder holding a chest CT series and an abdomen CT series."""
    study_uid = generate_uid()
    data = tmp_path / "in"
    chest = _write_series(data / "a", study_uid, "CT", "Thorax 1.0", "CHEST")
    abdomen = _write_series(data / "b", study_uid, "CT", "Abdomen 3.0", "ABDOMEN")
    (data / "notes.txt").write_text("not DICOM")
    config = tmp_path / "radgate.yaml"
    rules = [_rule("chest-ct", {"Modality": {"equals": "CT"}, "BodyPartExamined": {"equals": "CHEST"}})]
    config.write_text(yaml.safe_dump({"destinations": {"pacs": DESTINATIONS["pacs"]}, "rules": rules}))
    return config, data, chest, abdomen


def test_rules_check_cli_text_and_json(study_on_disk: tuple[Path, Path, str, str]) -> None:
    config, data, chest, abdomen = study_on_disk
    args = [str(RADGATE), "rules", "check", "--config", str(config), "--pipelines", "ct-lung", str(data)]
    text = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"series {chest} #1 CT 'Thorax 1.0' (2 instances)\n    -> chest-ct: pipeline ct-lung" in text
    assert f"series {abdomen} #2" in text
    assert "chest-ct did not match: BodyPartExamined: wanted equals 'CHEST', got 'ABDOMEN'" in text
    assert "1 file(s) skipped" in text
    report = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, check=True).stdout)
    (study,) = report["studies"]
    by_uid = {s["series_uid"]: s for s in study["series"]}
    assert by_uid[chest]["action"] == {
        "rule": "chest-ct",
        "pipeline": "ct-lung",
        "destinations": ["pacs"],
        "scope": "series",
    }
    assert by_uid[abdomen]["action"] is None
    assert [j["series_uid"] for j in study["jobs"]] == [chest]
    for output in (text, json.dumps(report)):
        assert "Secret" not in output and "SECRET-ID" not in output


def test_rules_check_refuses_unknown_pipeline_and_destination(
    study_on_disk: tuple[Path, Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, data, _, _ = study_on_disk
    base = ["rules", "check", "--config", str(config), str(data)]
    assert main([*base, "--pipelines", "mr-brain"]) == 2
    assert "rule 'chest-ct': unknown pipeline 'ct-lung'" in capsys.readouterr().err
    assert main([*base, "--pipelines", "ct-lung", "--destination", "archive"]) == 2
    assert "destination override 'archive'" in capsys.readouterr().err
    assert main([*base[:-1], "--pipelines", "ct-lung", str(data / "missing")]) == 2
