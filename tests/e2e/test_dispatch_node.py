"""The whole way round: a study sent to `radgate serve` comes back into the archive (a real Orthanc)
as results, through the executor and the outbox, and every delivery ends SENT."""

from __future__ import annotations

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
    settings = {"destinations": {"archive": archive}, "dispatch": {"poll_interval_s": 0.2}}
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

    def all_sent() -> list[dict[str, Any]] | None:
        found = node.deliveries(cli=False)
        return found if found and all(d["state"] == "SENT" for d in found) else None

    done = wait_until(all_sent, 240, "every delivery SENT", interval=0.5)
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_study(study_uid)}
    assert stored == {d["sop_instance_uid"] for d in done}
    assert {d["destination"] for d in done} == {"archive"}
