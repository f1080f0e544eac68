"""The real-Orthanc fixture: it starts, speaks DICOM and REST, and leaves nothing behind."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from dicom_io.testing import tools
from dicom_io.testing.orthanc_server import Modality, OrthancError, OrthancServer
from dicom_io.testing.synthetic import SyntheticSeries


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_storescu_phantom_then_list_it_over_rest(
    orthanc: OrthancServer, ct_phantom: SyntheticSeries, ct_phantom_dir: Path
) -> None:
    assert orthanc.rest_get("/system")["DicomAet"] == "ORTHANC"
    assert tools.echoscu(orthanc.host, orthanc.dicom_port, orthanc.aet).ok
    result = tools.storescu(orthanc.host, orthanc.dicom_port, orthanc.aet, [ct_phantom_dir])
    assert result.all_succeeded, result.output
    assert len(result.statuses) == len(ct_phantom.datasets)

    assert orthanc.study_uids() == [ct_phantom.study_uid]
    instances = orthanc.instances_of_study(ct_phantom.study_uid)
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == {
        str(ds.SOPInstanceUID) for ds in ct_phantom.datasets
    }
    (series,) = orthanc.series_of_study(ct_phantom.study_uid)
    assert series["MainDicomTags"]["SeriesInstanceUID"] == ct_phantom.series_uid

    first = next(i for i in instances if i["MainDicomTags"]["InstanceNumber"] == "1")
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(first["ID"])))
    hu = stored.pixel_array.astype(np.int32) + int(stored.RescaleIntercept)
    assert np.array_equal(hu, ct_phantom.voxels[0])

    found = tools.findscu(
        orthanc.host, orthanc.dicom_port, orthanc.aet, {"StudyInstanceUID": "", "ModalitiesInStudy": ""}
    )
    assert found.ok and [str(m.StudyInstanceUID) for m in found.matches] == [ct_phantom.study_uid]


def test_rest_upload_dicomweb_and_reset(
    orthanc: OrthancServer, mr_phantom: SyntheticSeries, mr_phantom_dir: Path
) -> None:
    ids = orthanc.upload([mr_phantom_dir])
    assert len(ids) == len(mr_phantom.datasets)
    assert orthanc.wait_for_instances(mr_phantom.study_uid, len(ids), timeout=10)
    if orthanc.dicomweb:
        studies = orthanc.rest_get("/dicom-web/studies")
        assert [s["0020000D"]["Value"][0] for s in studies] == [mr_phantom.study_uid]
    with pytest.raises(OrthancError, match="404"):
        orthanc.rest_get("/studies/no-such-study")
    orthanc.add_modality("later", Modality("LATER", "127.0.0.1", 11112))
    orthanc.reset()
    assert orthanc.studies() == [] and orthanc.instances_of_study(mr_phantom.study_uid) == []
    assert "later" not in orthanc.rest_get("/modalities") and orthanc.modalities == {}


def test_orthanc_sends_to_a_declared_modality(orthanc: OrthancServer, ct_phantom: SyntheticSeries) -> None:
    """The modality entry is how Orthanc forwards to radgate; a second Orthanc stands in for radgate here."""
    with OrthancServer(aet="PEER") as peer:
        orthanc.add_modality("peer", Modality("PEER", peer.host, peer.dicom_port))
        assert "peer" in orthanc.rest_get("/modalities")
        for ds in ct_phantom.datasets[:3]:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            orthanc.rest_post("/instances", data=buffer.getvalue())
        study = orthanc.study_id(ct_phantom.study_uid)
        orthanc.rest_post("/modalities/peer/store", {"Resources": [study], "Synchronous": True})
        assert len(peer.instances_of_study(ct_phantom.study_uid)) == 3


def test_python_plugin_runs_the_given_script(tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text(
        "import json, orthanc\n"
        "def hello(output, uri, **request):\n"
        "    section = json.loads(orthanc.GetConfiguration())['RadgateTest']\n"
        "    output.AnswerBuffer(section['greeting'], 'text/plain')\n"
        "orthanc.RegisterRestCallback('/radgate-hello', hello)\n"
    )
    with OrthancServer(python_script=script, extra_config={"RadgateTest": {"greeting": "hi"}}) as server:
        assert "python" in server.rest_get("/plugins")
        assert server.rest_get_bytes("/radgate-hello") == b"hi"


def test_credentials_switch_on_authentication() -> None:
    with OrthancServer(credentials=("radgate", "s3cret")) as server:
        assert requests.get(f"{server.url}/system", timeout=5).status_code == 401
        assert server.rest_get("/system")["Name"].startswith("radgate-test")


def test_stop_releases_ports_and_files(tmp_path: Path) -> None:
    server = OrthancServer().start()
    workdir, http_port, dicom_port = server.workdir, server.http_port, server.dicom_port
    assert workdir is not None and (workdir / "orthanc.json").is_file()
    assert server.render_config()["RemoteAccessAllowed"] is False
    server.stop()
    assert not server.running and not workdir.exists()
    assert not _port_open(http_port) and not _port_open(dicom_port)
    server.stop()  # idempotent


def test_a_broken_config_fails_fast_with_the_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server = OrthancServer(workdir=tmp_path)
    monkeypatch.setattr(server, "render_config", lambda: {"HttpPort": "not a port"})
    with pytest.raises(OrthancError, match="exited"):
        server.start(attempts=1)
    assert not server.running
