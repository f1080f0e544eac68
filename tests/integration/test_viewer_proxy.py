"""The demo viewer's /dicom-web in front of a real Orthanc: same answers, URLs back to its own origin."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dicom_io.testing.orthanc_server import OrthancServer
from dicom_io.testing.synthetic import SyntheticSeries
from plugin.demo.viewer import ViewerServer

FRAME = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def test_dicomweb_through_the_viewer_equals_orthancs_and_links_back_to_it(
    orthanc: OrthancServer, ct_phantom: SyntheticSeries, ct_phantom_dir: Path, tmp_path: Path
) -> None:
    if not orthanc.dicomweb:
        pytest.skip("Orthanc's DICOMweb plugin (orthanc-dicomweb) is not installed")
    orthanc.upload(sorted(ct_phantom_dir.iterdir())[:3])
    (tmp_path / "index.html").write_text("<html>OHIF</html>")
    study = ct_phantom.study_uid
    with ViewerServer(orthanc.dicomweb_url, dist=tmp_path) as viewer, httpx.Client(timeout=30) as http:
        via = http.get(
            f"{viewer.url}/dicom-web/studies/{study}/series", headers={"Accept": "application/dicom+json"}
        )
        direct = http.get(f"{orthanc.dicomweb_url}/studies/{study}/series")
        assert via.status_code == 200
        [series] = via.json()
        assert via.json() == [
            {**s, "00081190": series["00081190"]} for s in direct.json()
        ]  # equal but for the RetrieveURL, which names the viewer's origin
        assert series["00081190"]["Value"][0].startswith(f"{viewer.url}/dicom-web/studies/{study}/series/")

        series_uid = series["0020000E"]["Value"][0]
        [first, *_] = http.get(f"{viewer.url}/dicom-web/studies/{study}/series/{series_uid}/metadata").json()
        pixels = first["7FE00010"]["BulkDataURI"]
        assert pixels.startswith(f"{viewer.url}/dicom-web/")  # OHIF fetches the pixels from the same origin

        sop = first["00080018"]["Value"][0]
        frame = f"/studies/{study}/series/{series_uid}/instances/{sop}/frames/1"
        via_frame = http.get(f"{viewer.url}/dicom-web{frame}", headers={"Accept": FRAME})
        direct_frame = http.get(f"{orthanc.dicomweb_url}{frame}", headers={"Accept": FRAME})
        assert via_frame.status_code == 200
        assert via_frame.headers["content-type"].startswith("multipart/related")
        assert _first_part(via_frame) == _first_part(direct_frame)
        rows, columns = (first[tag]["Value"][0] for tag in ("00280010", "00280011"))
        assert len(_first_part(via_frame)) == rows * columns * 2  # one 16-bit frame, whole

        unknown = f"/studies/{study}.9/series"
        assert (
            http.get(f"{viewer.url}/dicom-web{unknown}").status_code
            == http.get(f"{orthanc.dicomweb_url}{unknown}").status_code
        )


def _first_part(answer: httpx.Response) -> bytes:
    """The body of the first part of a multipart/related answer."""
    boundary = answer.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = answer.content.split(f"--{boundary}".encode())[1]
    return part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
