"""Shared fixtures: the test data folder, small written phantoms, a real Orthanc, a real PostgreSQL,
a real Chromium.

Session-scoped phantom folders are shared by every test: read them, never modify them.
Modules with a test marked slow are collected first (see pytest_collection_modifyitems).
Real-data tests skipped because the shared test data or tools are missing (support.testdata) are
counted in one line at the very end of the run.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support.postgres import PostgresServer, find_initdb
from support.testdata import pytest_terminal_summary as pytest_terminal_summary  # counts real-data skips
from support.testdata import pytest_unconfigure as pytest_unconfigure  # and prints them last
from support.testdata import require_path, shared_testdata_dir

from dicom_io.testing.orthanc_server import OrthancError, OrthancServer, find_plugin
from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom, mr_head_phantom
from dicom_io.testing.tools import ToolNotFoundError

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# A test worker builds and drops millions of small objects (pydicom datasets, highdicom content trees)
# beside the hundreds of thousands that its imports keep (torch, MONAI): at Python's default thresholds
# the cycle collector runs every 700 allocations and rescans the survivors often. Rarer passes collect
# the same cycles later and spare 5-7 % of the CPU of the result-building modules (bench/README.md, "tests").
gc.set_threshold(50_000, 20, 100)

# Modules whose module-scoped fixture is parametrized and costly to build: pytest-xdist hands out
# each variant (the test id's brackets) as a scope of its own, so the variants run side by side.
VARIANT_MODULES = frozenset({"tests/e2e/test_cluster.py"})

# Modules that one xdist worker runs one after another, each group as one scope (a test id below names a
# module or one variant):
# - "ray": the tests that start a Ray (a head, or a driver's own). Each Ray start costs seconds of CPU at
#   once, and Rays side by side on one machine meet on the fixed default ports of their helper processes
#   ("Address already in use" in a monitor's log).
# - "pixelmed": the tests that run DicomSRValidator. Its JVM, and the template pass it runs once per
#   distinct content tree, are per process (dicom_io/testing/validate.py): one worker pays them once.
# - "chromium": the tests that drive a browser, which share the worker's one Chromium (`chromium`).
SHARED_SCOPES = {
    "ray": (
        "tests/integration/test_ray_executor.py",
        "tests/integration/test_ray_head.py",
        "tests/e2e/test_ray_node.py",
        "tests/e2e/test_cluster.py[ray",
    ),
    "pixelmed": (
        "tests/integration/test_sr.py",
        "tests/integration/test_result_headers.py",
        "tests/integration/test_results_validate.py",
    ),
    "chromium": (
        "tests/integration/test_console.py",
        "tests/integration/test_fetch.py",
        "tests/integration/test_web_browser.py",
        "tests/e2e/test_demo_viewer.py",
    ),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a test marked slow first, each module's tests together and in their order."""
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With `--dist loadscope`: whole modules to a worker (their fixtures are built once), in the
    collection order above so that the long modules start early; each VARIANT_MODULES' variant apart;
    each SHARED_SCOPES group together, on one worker."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module in VARIANT_MODULES and nodeid.endswith("]"):
                module = f"{module}[{nodeid.rsplit('[', 1)[1]}"
            return next((name for name, ids in SHARED_SCOPES.items() if module.startswith(ids)), module)

    return ModuleScheduling(config, log)


@pytest.fixture(scope="module")
def torch_on_one_thread() -> Iterator[None]:
    """For a module's whole run (`pytest.mark.usefixtures` in its ``pytestmark``), torch computes on
    one thread (`support.pipeline.one_torch_thread`): the test command runs more processes than there
    are cores, where a second thread only waits for one (bench/README.md, "tests")."""
    from support.pipeline import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """One headless Chromium for the worker's browser tests (`support.browser`); each page takes a
    browser context of its own (`chromium_page`), so pages share no cookies or storage."""
    from support.browser import chromium_browser

    with chromium_browser() as browser:
        yield browser


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared test data: shared/testdata beside the repository clone; RADGATE_TESTDATA overrides."""
    return require_path(shared_testdata_dir())


@pytest.fixture(scope="session")
def ct_phantom() -> SyntheticSeries:
    """A small axial chest CT (96x96x40, about 4.2 x 4.2 x 7.5 mm) with its truth."""
    return ct_chest_phantom(rows=96, columns=96, slices=40, seed=1)


@pytest.fixture(scope="session")
def ct_phantom_dir(ct_phantom: SyntheticSeries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ct_phantom written as one file per slice (IM00001.dcm ...)."""
    out = tmp_path_factory.mktemp("ct_phantom")
    ct_phantom.write(out)
    return out


@pytest.fixture(scope="session")
def mr_phantom() -> SyntheticSeries:
    """A small axial T1 head MR (96x96x40, 2.5 x 2.5 x 5.5 mm) with its truth."""
    return mr_head_phantom(rows=96, columns=96, slices=40, seed=2)


@pytest.fixture(scope="session")
def mr_phantom_dir(mr_phantom: SyntheticSeries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mr_phantom")
    mr_phantom.write(out)
    return out


def _dicomweb_available() -> bool:
    try:
        find_plugin("libOrthancDicomWeb.so")
    except OrthancError:
        return False
    return True


@pytest.fixture(scope="session")
def orthanc_session() -> Iterator[OrthancServer]:
    """One Orthanc (AE "ORTHANC", DICOMweb when installed) on free loopback ports for the whole run.

    Shared because Orthanc takes about 3 s to shut down; use the `orthanc` fixture, which empties it.
    """
    server = OrthancServer(dicomweb=_dicomweb_available())
    try:
        server.start()
    except ToolNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def orthanc(orthanc_session: OrthancServer) -> OrthancServer:
    """The shared Orthanc, emptied of studies and runtime-added modalities; restarted if a test stopped it."""
    if not orthanc_session.running:
        orthanc_session.start()
    orthanc_session.reset()
    return orthanc_session


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session; each test takes a new database from it.

    Skips where PostgreSQL or psycopg is missing, unless ``RADGATE_REQUIRE_POSTGRES`` is set (the test
    command sets it: there, a store test that did not run on PostgreSQL is a failure)."""
    missing = None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "psycopg is not installed"
    initdb = find_initdb()
    if initdb is None:
        missing = missing or "PostgreSQL's initdb is not installed"
    if missing is not None:
        if os.environ.get("RADGATE_REQUIRE_POSTGRES"):
            pytest.fail(f"{missing}, and RADGATE_REQUIRE_POSTGRES is set")
        pytest.skip(missing)
    assert initdb is not None
    root = Path(tempfile.mkdtemp(prefix="radgate-postgres-"))  # not under pytest's root-only folder
    server = PostgresServer(root, initdb)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
