"""The Orthanc plugin's work without the plugin: the bridge against a real Orthanc's REST API over
HTTP (the plugin uses the same API in-process), the change-log cursor, the REST wrapper, settings."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid
from support.node import write_series

from dicom_io.net import file_meta_header
from dicom_io.testing.orthanc_server import OrthancServer
from plugin.config import Config, ConfigError, load_config
from plugin.dispatch.outbox import enqueue_deliveries
from plugin.ingest.datadir import ORTHANC_PLUGIN, SERVE, DataDirBusy, DataDirLock
from plugin.orthanc.bridge import Bridge, ChangeCursor, ImportFailed, Submitted
from plugin.orthanc.entry import PluginSettings, RunRequest, rest_route
from plugin.store.engine import Store
from plugin.store.queries import StudySummary

REPO = Path(__file__).resolve().parents[2]


class HttpRest:
    """`RestApi` over HTTP: what the plugin gets from orthanc.RestApiGet, from outside Orthanc."""

    def __init__(self, server: OrthancServer) -> None:
        self.server = server

    def get(self, path: str) -> bytes:
        return self.server.rest_get_bytes(path)


def _config(tmp_path: Path) -> Config:
    return Config.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "rules": [{"name": "chest", "match": {"Modality": {"equals": "CT"}}, "pipeline": "ct-lung"}],
            "destinations": {"orthanc": {"kind": "orthanc", "url": "http://127.0.0.1:1"}},
        }
    )


@pytest.fixture()
def bridge(tmp_path: Path, orthanc: OrthancServer) -> Iterator[Bridge]:
    b = Bridge(_config(tmp_path), HttpRest(orthanc))
    b.prepare()
    yield b
    b.close()


def _upload(orthanc: OrthancServer, files: list[Path]) -> tuple[str, str]:
    """Put files into Orthanc; (Orthanc study id, StudyInstanceUID)."""
    orthanc.upload(files)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc_id = orthanc.study_id(study_uid)
    assert orthanc_id is not None
    return orthanc_id, study_uid


def _study(bridge: Bridge, study_uid: str) -> StudySummary:
    [study] = [s for s in bridge.store.studies() if s.study_uid == study_uid]
    return study


def _counts(submitted: Submitted) -> tuple[int, int, int, int]:
    i = submitted.imported
    return i.stored, i.known, i.refused, len(submitted.jobs)


def test_a_study_submitted_twice_is_stored_and_routed_once(
    bridge: Bridge, orthanc: OrthancServer, tmp_path: Path
) -> None:
    orthanc_id, study_uid = _upload(orthanc, write_series(tmp_path / "ct", 5))
    first = bridge.submit(orthanc_id)
    assert _counts(first) == (5, 0, 0, 1)
    assert len(list((bridge.config.spool_dir / study_uid).rglob("*.dcm"))) == 5
    again = bridge.submit(orthanc_id)
    assert _counts(again) == (0, 5, 0, 0)
    study = _study(bridge, study_uid)
    assert (study.revision, study.state, study.instance_count) == (1, "COMPLETE", 5)
    [job] = bridge.jobs()
    assert (job["id"], job["pipeline"], job["rule"], job["destinations"]) == (
        first.jobs[0],
        "ct-lung",
        "chest",
        ["orthanc"],
    )
    assert list(bridge.incoming.iterdir()) == []  # temporary copies gone


def test_results_radgate_sent_are_not_taken_back_but_new_instances_are(
    bridge: Bridge, orthanc: OrthancServer, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "ct", 5)
    orthanc_id, study_uid = _upload(orthanc, files)
    [job_id] = bridge.submit(orthanc_id).jobs
    result = write_series(tmp_path / "result", 1, study_uid=study_uid)[0]  # stands in for a SEG radgate made
    sop = str(pydicom.dcmread(result, stop_before_pixels=True).SOPInstanceUID)
    with bridge.store.session() as s:
        enqueue_deliveries(s, job_id, [(sop, result)], ["orthanc"])
    orthanc.upload([result])
    assert _counts(bridge.submit(orthanc_id)) == (0, 6, 0, 0)
    assert _study(bridge, study_uid).revision == 1

    orthanc.upload(write_series(tmp_path / "more", 5, study_uid=study_uid))  # a new series from the PACS
    more = bridge.submit(orthanc_id)
    assert _counts(more) == (5, 6, 0, 1)
    assert _study(bridge, study_uid).revision == 2


def test_on_demand_runs_a_named_pipeline_on_the_series_it_prefers_or_the_rules_again(
    bridge: Bridge, orthanc: OrthancServer, tmp_path: Path
) -> None:
    short = write_series(tmp_path / "short", 5)
    study_uid = str(pydicom.dcmread(short[0], stop_before_pixels=True).StudyInstanceUID)
    long = write_series(tmp_path / "long", 90, study_uid=study_uid, size=8)  # 90 mm: what ct-lung wants
    long_uid = str(pydicom.dcmread(long[0], stop_before_pixels=True).SeriesInstanceUID)
    orthanc_id, _ = _upload(orthanc, [*short, *long])
    bridge.submit(orthanc_id)  # the series-scope rule: one job per CT series
    named = bridge.submit(orthanc_id, pipeline="ct-lung", force=True)
    routed = bridge.submit(orthanc_id, force=True)
    jobs = {j["id"]: j for j in bridge.jobs()}
    assert len(jobs) == 5
    [named_id] = named.jobs
    assert (jobs[named_id]["pipeline"], jobs[named_id]["rule"]) == ("ct-lung", "on-demand")
    assert jobs[named_id]["series_uid"] == long_uid  # not the first or the 5-slice series
    assert [jobs[i]["rule"] for i in routed.jobs] == ["chest", "chest"]
    with pytest.raises(LookupError):
        bridge.complete("1.2.3.4", "ct-lung", force=True)
    with pytest.raises(LookupError, match="nope"):
        bridge.complete(study_uid, "nope", force=True)

    # a study with no series the pipeline can use: no job on demand (the log says why), not a FAILED one
    lone_id, _ = _upload(orthanc, write_series(tmp_path / "lone", 5))
    assert bridge.submit(lone_id, pipeline="ct-lung", force=True).jobs == ()


def test_a_destination_the_radgate_config_lacks_is_refused(tmp_path: Path, orthanc: OrthancServer) -> None:
    with pytest.raises(ConfigError, match="'pacs' is not a destination"):
        Bridge(_config(tmp_path), HttpRest(orthanc), ["pacs"])


# --- following Orthanc's change log ----------------------------------------------------------------


class FilesRest:
    """`RestApi` serving one study of the given files: what Orthanc would hand over, byte for byte."""

    def __init__(self, study_uid: str, files: dict[str, bytes]) -> None:
        self.study_uid = study_uid
        self.files = files

    def get(self, path: str) -> bytes:
        if path == "/studies/s":
            return json.dumps({"MainDicomTags": {"StudyInstanceUID": self.study_uid}}).encode()
        if path == "/studies/s/instances":
            listed = [{"ID": name, "MainDicomTags": {"SOPInstanceUID": name}} for name in self.files]
            return json.dumps(listed).encode()
        return self.files[path.removeprefix("/instances/").removesuffix("/file")]


def _nested(depth: int) -> bytes:
    """`depth` Content Sequences of undefined length (Explicit VR LE), each in the one item above."""
    inner = struct.pack("<HH2sH", 0x0040, 0xA160, b"UT", 0) + bytes(4)  # a UT of length 0
    for _ in range(depth):
        item = (
            struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        )
        inner = struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF) + item
        inner += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return inner


def test_an_instance_is_checked_as_the_transport_checks_one_before_it_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bridge runs the transport's walk on Orthanc's file, not pydicom alone: a file cut short
    (which pydicom reads without complaint) and a nest 300 deep are refused with a log line, and a
    dataset without SOP UIDs takes them from its file meta, as spool recovery does."""
    good, cut, bare = write_series(tmp_path / "src", 3)
    study_uid = str(pydicom.dcmread(good, stop_before_pixels=True).StudyInstanceUID)
    ds = pydicom.dcmread(bare)
    bare_sop = str(ds.SOPInstanceUID)
    del ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(bare)
    deep_sop = generate_uid()
    header = b"".join(
        struct.pack("<HH2sH", 0x0020, element, b"UI", len(uid)) + uid
        for element, uid in (
            (0x000D, study_uid.encode() + b"\0" * (len(study_uid) % 2)),
            (0x000E, b"1.2.3.4\0"),
        )
    )
    deep = file_meta_header(ComprehensiveSRStorage, deep_sop, ExplicitVRLittleEndian, "CRAFTED") + header
    files = {"good": good.read_bytes(), "cut": cut.read_bytes()[:-100], "bare": bare.read_bytes()}
    files["deep"] = deep + _nested(300)
    with caplog.at_level("WARNING"):
        b = Bridge(_config(tmp_path), FilesRest(study_uid, files))
        b.prepare()
        try:
            imported = b.import_study("s")
        finally:
            b.close()
    assert (imported.stored, imported.refused) == (2, 2)
    for name in ("cut", "deep"):
        assert f"orthanc instance {name} not taken: not a storable instance" in caplog.text
    store = Store(_config(tmp_path).db_url)
    try:
        [study] = store.studies()
        assert study.instance_count == 2
        assert store.recorded_paths(study_uid) >= {f"{study_uid}/{ds.SeriesInstanceUID}/{bare_sop}.dcm"}
    finally:
        store.dispose()
    assert list((tmp_path / "data" / "incoming-orthanc").iterdir()) == []


class ChangeLog:
    """A scripted ``/changes``: the plugin's view of Orthanc's change log."""

    def __init__(self, changes: list[tuple[int, str, str]]) -> None:
        self.changes: list[dict[str, Any]] = [
            {"Seq": seq, "ChangeType": kind, "ID": rid} for seq, kind, rid in changes
        ]

    def get(self, path: str) -> bytes:
        query = dict(part.partition("=")[::2] for part in path.split("?")[1].split("&"))
        last = max((c["Seq"] for c in self.changes), default=0)
        if "last" in query:
            return json.dumps({"Changes": self.changes[-1:], "Done": True, "Last": last}).encode()
        since, limit = int(query["since"]), int(query["limit"])
        page = [c for c in self.changes if c["Seq"] > since][:limit]
        done = not page or page[-1]["Seq"] == last
        return json.dumps({"Changes": page, "Done": done, "Last": last}).encode()


def test_one_orthanc_plugin_per_data_dir_beside_a_radgate_serve(tmp_path: Path) -> None:
    """The plugin empties its incoming folder at start: another Orthanc's plugin on the same data dir
    would delete its copies. A `radgate serve` there is fine (its own incoming folder)."""
    config = _config(tmp_path)
    leftover = config.data_dir / "incoming-orthanc" / "1.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"a copy a crash interrupted")
    serve = DataDirLock(config.data_dir, config.file_modes, SERVE)
    other = DataDirLock(config.data_dir, config.file_modes, ORTHANC_PLUGIN)  # another Orthanc's plugin
    serve.acquire()
    other.acquire()
    bridge = Bridge(config, ChangeLog([]))
    try:
        with pytest.raises(
            DataDirBusy, match=f"in use by the radgate plugin of an Orthanc, pid {os.getpid()} "
        ):
            bridge.prepare()
        assert leftover.exists() and not (config.data_dir / "radgate.db").exists()
        other.release()
        bridge.prepare()
        assert not leftover.exists()
        with pytest.raises(DataDirBusy):
            other.acquire()
    finally:
        bridge.close()
        other.release()
        serve.release()


class Recorder(Bridge):
    """A bridge that records the studies it is given instead of importing them; ``fail`` raises
    ``error`` for that study."""

    def __init__(
        self, config: Config, rest: ChangeLog, fail: str | None = None, error: Exception | None = None
    ) -> None:
        super().__init__(config, rest, max_attempts=3)
        self.seen: list[str] = []
        self.fail = fail
        self.error = error or OSError("disk full")

    def _stable_study(self, orthanc_id: str, stop: Any) -> None:
        if orthanc_id == self.fail:
            raise self.error
        self.seen.append(orthanc_id)


def test_the_change_log_is_followed_from_the_cursor_and_a_failure_is_tried_again(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.data_dir.mkdir(parents=True)
    log = ChangeLog([(1, "StableStudy", "a"), (2, "NewInstance", "x"), (3, "StableStudy", "b")])
    first = Recorder(config, log)
    assert first.follow_changes() == 0 and first.cursor.load() == 3  # a first start begins at the end
    log.changes += [{"Seq": 4 + n, "ChangeType": "StableStudy", "ID": f"s{n}"} for n in range(150)]
    failing = Recorder(config, log, fail="s120")
    with pytest.raises(OSError):
        failing.follow_changes()
    assert failing.seen == [f"s{n}" for n in range(120)] and failing.cursor.load() == 4 + 119
    again = Recorder(config, log)
    assert again.follow_changes() == 30 and again.seen[0] == "s120" and again.cursor.load() == 153

    ChangeCursor(config.data_dir / "orthanc-changes.json").save(500)  # Orthanc's database was replaced
    fresh = Recorder(config, ChangeLog([(1, "StableStudy", "new")]))
    assert fresh.follow_changes() == 1 and fresh.seen == ["new"] and fresh.cursor.load() == 1


def test_a_study_that_keeps_failing_is_set_aside_unless_radgate_cannot_store(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.data_dir.mkdir(parents=True)
    log = ChangeLog([(1, "StableStudy", "old")])
    Recorder(config, log).follow_changes()  # the cursor starts at the end
    log.changes += [{"Seq": 2 + n, "ChangeType": "StableStudy", "ID": f"s{n}"} for n in range(3)]
    full = Recorder(config, log, fail="s1", error=ImportFailed("radgate could not store SOP 1.2.3"))
    for _ in range(5):  # radgate cannot store: every study waits, however often it is tried
        with pytest.raises(ImportFailed):
            full.follow_changes()
    assert full.seen == ["s0"] and full.cursor.set_aside_studies() == []
    poison = Recorder(config, log, fail="s1", error=KeyError("odd header"))
    for _ in range(2):
        with pytest.raises(KeyError):
            poison.follow_changes()
    assert poison.follow_changes() == 2  # the third failure in a row sets it aside and goes on
    assert poison.seen == ["s2"] and poison.cursor.load() == 4
    [aside] = poison.cursor.set_aside_studies()
    assert (aside["orthanc_id"], aside["seq"]) == ("s1", 3) and "KeyError" in aside["error"]
    log.changes.append({"Seq": 5, "ChangeType": "StableStudy", "ID": "s1"})  # fixed, stable again
    assert Recorder(config, log).follow_changes() == 1


# --- the REST wrapper and the settings ---------------------------------------------------------------


class Output:
    """Records what a REST callback answers, like Orthanc's output object."""

    def __init__(self) -> None:
        self.answers: list[tuple[Any, ...]] = []

    def AnswerBuffer(self, data: bytes, mime: str) -> None:
        self.answers.append((200, json.loads(data)))

    def SendHttpStatus(self, status: int, body: str, size: int) -> None:
        self.answers.append((status, json.loads(body)))

    def SendMethodNotAllowed(self, allowed: str) -> None:
        self.answers.append((405, allowed))


def test_rest_routes_answer_json_and_never_raise() -> None:
    def handler(uri: str, request: dict[str, Any]) -> tuple[int, Any]:
        if request["body"] == b"boom":
            raise RuntimeError("bug")
        return 200, {"uri": uri}

    callback = rest_route("POST", handler)
    out = Output()
    callback(out, "/radgate/x", method="POST", body=b"")
    callback(out, "/radgate/x", method="GET", body=b"")
    callback(out, "/radgate/x", method="POST", body=b"boom")
    assert out.answers == [(200, {"uri": "/radgate/x"}), (405, "POST"), (500, {"error": "RuntimeError: bug"})]
    assert RunRequest.model_validate_json(b"{}").pipeline is None


def test_the_shipped_plugin_templates_are_valid() -> None:
    orthanc_config = json.loads((REPO / "orthanc_config" / "radgate-plugin.json").read_text())
    settings = PluginSettings.from_orthanc(orthanc_config)
    assert settings.config_file == Path("/etc/radgate/radgate.yaml") and settings.destinations == ["orthanc"]
    assert orthanc_config["PythonScript"].endswith("orthanc_config/radgate_plugin.py")
    config = load_config(REPO / "orthanc_config" / "radgate-plugin.yaml")
    assert set(settings.destinations or ()) <= set(config.destinations)
    assert yaml.safe_load((REPO / "orthanc_config" / "radgate-plugin.yaml").read_text())["data_dir"] == str(
        settings.data_dir
    )
    with pytest.raises(ConfigError, match="ConfigFle"):
        PluginSettings.from_orthanc({"Radgate": {"ConfigFle": "/x"}})
