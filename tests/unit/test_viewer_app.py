"""The demo viewer's app in process: OHIF's files and fallback, its config, the proxy's refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from dicom_io.testing.tools import free_port
from plugin.demo.viewer import ViewerError, app_config, create_app, ohif_dist


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The app over a stand-in dist/ and a DICOMweb URL where nothing listens."""
    (tmp_path / "index.html").write_text("<html>OHIF</html>")
    (tmp_path / "app.bundle.js").write_text("console.log('bundle')")
    with TestClient(create_app(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path)) as client:
        yield client


def test_files_are_served_and_any_other_path_gets_index_html(client: TestClient) -> None:
    assert client.get("/app.bundle.js").text == "console.log('bundle')"
    for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/segmentation/x"):
        answer = client.get(path)
        assert (answer.status_code, answer.text) == (200, "<html>OHIF</html>"), path


def test_app_config_points_ohif_at_the_same_origin_dicomweb(client: TestClient) -> None:
    answer = client.get("/app-config.js")
    assert answer.headers["content-type"].startswith("application/javascript")
    assert answer.text == app_config()
    config = json.loads(answer.text.removeprefix("window.config = ").removesuffix(";\n"))
    [source] = config["dataSources"]
    assert config["defaultDataSourceName"] == source["sourceName"]
    roots = {key: source["configuration"][key] for key in ("qidoRoot", "wadoRoot", "wadoUriRoot")}
    assert set(roots.values()) == {"/dicom-web"}


def test_the_proxy_refuses_what_is_not_a_dicomweb_read(client: TestClient) -> None:
    assert client.get("/dicom-web/studies/..%2F..%2Fsystem").status_code == 400
    assert client.post("/dicom-web/studies", content=b"x").status_code == 405
    down = client.get("/dicom-web/studies")
    assert down.status_code == 502
    assert "did not answer" in down.text


def test_a_missing_ohif_install_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ViewerError, match=r"run scripts/setup\.sh"):
        ohif_dist(tmp_path)
