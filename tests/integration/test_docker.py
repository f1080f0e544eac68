"""The deployment files in docker/, checked without a docker engine (there is none here): every file
they name exists, every command is a real radgate subcommand, the configurations load, and the
Orthanc image installs what the plugin imports. With the compose plugin, `docker compose config`."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugin.cli import build_parser
from plugin.config import load_config
from plugin.orthanc.entry import PluginSettings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
CONFIG_IN_CONTAINER = "/etc/radgate/radgate.yaml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _check_radgate_command(command: list[str]) -> argparse.Namespace:
    """A real subcommand with options the parser accepts (SystemExit otherwise)."""
    assert command[0] == "radgate", command
    return build_parser().parse_args(command[1:])


def test_compose_services_run_real_commands_on_real_files() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"orthanc", "node", "worker"}
    assert set(compose["volumes"]) == {"radgate-data", "orthanc-db"}
    for name, service in services.items():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        assert service["healthcheck"]["test"][0] == "CMD", name
        mounts = [m.split(":") for m in service["volumes"]]
        for source, *_ in mounts:
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: {source}"
        assert ["radgate-data", "/var/lib/radgate"] in [m[:2] for m in mounts], name
        assert CONFIG_IN_CONTAINER in [m[1] for m in mounts], name
    assert services["node"]["command"][:2] == ["radgate", "serve"]
    assert services["worker"]["command"][:2] == ["radgate", "worker"]
    for name in ("node", "worker"):
        assert _check_radgate_command(services[name]["command"]).config == Path(CONFIG_IN_CONTAINER)
    [gpu] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_dockerfiles_copy_files_that_exist_and_start_radgate() -> None:
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.orthanc"):
        steps = _instructions(dockerfile)
        for instruction, args in steps:
            if instruction == "COPY":
                *sources, _target = args.split()
                for source in sources:
                    assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}"
        [cmd] = [json.loads(args) for instruction, args in steps if instruction == "CMD"]
        if dockerfile.name == "Dockerfile":
            _check_radgate_command(cmd)
            assert "cuda" in steps[0][1] and "torch==" in dockerfile.read_text()
        else:
            assert cmd == ["Orthanc", "/etc/orthanc/orthanc.json"]


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_orthanc_image_installs_every_dependency_but_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {_distribution(r) for r in project["dependencies"]} - {"torch", "monai"}
    steps = _instructions(DOCKER / "Dockerfile.orthanc")
    installed = {
        re.split(r"[=<>!~\[]", word)[0].lower().replace("_", "-")  # pinned or not: the name
        for instruction, args in steps
        if instruction == "RUN" and "pip install" in args
        for word in args.split()
        if not word.startswith("-") and word not in {"&&", "install", ".", "python3", "venv"}
    }
    assert needed <= installed, needed - installed


def test_the_container_configurations_agree() -> None:
    orthanc = json.loads((DOCKER / "orthanc.json").read_text())
    settings = PluginSettings.from_orthanc(orthanc)
    assert orthanc["PythonScript"] == "/opt/radgate/orthanc_config/radgate_plugin.py"
    assert (REPO / "orthanc_config" / "radgate_plugin.py").is_file()
    assert str(settings.config_file) == CONFIG_IN_CONTAINER and settings.venv == Path("/opt/radgate/.venv")
    config = load_config(DOCKER / "radgate.yaml")
    assert str(config.data_dir) == str(settings.data_dir) == "/var/lib/radgate"
    destination = config.destinations["orthanc"]
    assert set(settings.destinations or ()) == {"orthanc"}
    assert destination.kind == "orthanc"
    assert destination.url == f"http://orthanc:{orthanc['HttpPort']}"
    assert destination.password is not None
    assert orthanc["RegisteredUsers"] == {destination.username: destination.password.get_secret_value()}
    assert str(orthanc["DicomPort"]) in {p.split(":")[0] for p in _compose()["services"]["orthanc"]["ports"]}


def _compose_command() -> list[str] | None:
    """Compose v2 (the docker CLI plugin) where installed, else Debian's docker-compose 1.29."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_docker_compose_config_accepts_the_file() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker compose nor docker-compose here (no engine either): YAML checked above")
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
