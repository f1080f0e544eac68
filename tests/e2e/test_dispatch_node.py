"""The whole way round: a study sent to `radgate serve` comes back into the archive (a real Orthanc)
as results, through the executor and the outbox, started by the node's wake-ups rather than its
polls, and every delivery ends SENT; a research destination on the same Orthanc gets the results
and the source series de-identified (all but the report card, which shows a date and is refused)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from support.node import NodeProcess

from dicom_io.testing.orthanc_server import OrthancServer, wait_until


@pytest.fixture()
def node(tmp_path: Path, orthanc: OrthancServer) -> Iterator[NodeProcess]:
    archive = {"kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.aet}
    research = {"kind": "orthanc", "url": orthanc.url, "deidentify": {"include_source": True}}
    destinations = {"archive": archive, "research": research}
    settings = {
        "destinations": destinations,
        "dicom": {"receivers": 1},  # received in the node's process: no receiving processes to start
        # polls that never come within the test: the node's own wake-ups start the job once the study
        # completes and the sends once the job's deliveries are queued
        "executor": {"poll_s": 600},
        "dispatch": {"poll_interval_s": 600},
    }
    n = NodeProcess(tmp_path / "node", settings).start()
    yield n
    assert n.stop() == 0, n.log()


@pytest.mark.slow  # the ct-lung pipeline in a worker process: about 45 s on 2 cores
def test_results_of_a_received_study_arrive_in_the_archive(
    node: NodeProcess, orthanc: OrthancServer, ct_phantom_dir: Path
) -> None:
    files = sorted(ct_phantom_dir.iterdir())
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sent = node.storescu(*files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def all_settled() -> list[dict[str, Any]] | None:
        found = node.deliveries(cli=False)
        return found if found and all(d["state"] in ("SENT", "DEAD") for d in found) else None

    done = wait_until(all_settled, 240, "every delivery SENT or DEAD", interval=0.5)
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(study_uid)}
    results = {d["sop_instance_uid"] for d in done if d["destination"] == "archive"}
    assert stored == results
    assert {d["state"] for d in done if d["destination"] == "archive"} == {"SENT"}

    research = {d["sop_instance_uid"]: d for d in done if d["destination"] == "research"}
    originals = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(research) == results | originals  # include_source: the series the job read, too
    # the report card prints the day it was made: refused at once without retained dates
    [card] = [d for d in research.values() if d["state"] != "SENT"]
    assert card["state"] == "DEAD" and card["attempts"] == 1 and "report card" in card["last_error"]
    [other] = [uid for uid in orthanc.study_uids() if uid != study_uid]
    copies = orthanc.instances_of_study(other)
    assert len(copies) == len(research) - 1
    assert not {i["MainDicomTags"]["SOPInstanceUID"] for i in copies} & set(research)
    sample = pydicom.dcmread(io.BytesIO(orthanc.instance_file(copies[0]["ID"])), stop_before_pixels=True)
    assert sample.PatientIdentityRemoved == "YES" and sample.PatientID.startswith("RG")
