"""The configuration: defaults, the shipped example, and errors that name the wrong key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ai_models.resources import BUILTIN_RESOURCES, Resources
from plugin.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_no_file_gives_embedded_defaults() -> None:
    config = load_config(None)
    assert config.dicom.ae_title == "RADGATE"
    assert config.dicom.port == 11112
    assert config.completion.quiet_period_s == 10.0
    assert config.db_url.startswith("sqlite:///")


def test_example_file_loads() -> None:
    config = load_config(REPO / "radgate.example.yaml")
    assert isinstance(config, Config)
    assert config.dicom == Config().dicom


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dicom:\n  prot: 104\n", "dicom.prot: unknown key"),
        ("dicom:\n  port: 70000\n", "dicom.port"),
        ("dicom:\n  max_sequence_depth: 300\n", "dicom.max_sequence_depth"),
        ("dicom:\n  ae_title: THIS_AE_TITLE_IS_TOO_LONG\n", "dicom.ae_title"),
        ("dicom:\n  allowed_peers:\n    - address: 10.0.0.300\n", "dicom.allowed_peers.0.address"),
        ("completion:\n  quiet_period_s: -1\n", "completion.quiet_period_s"),
        ("dicom:\n  tls:\n    enabled: true\n", "dicom.tls"),
        ("- just\n- a list\n", "must be a mapping"),
        ("dicom: [unclosed\n", "not valid YAML"),
        ("executor:\n  kind: slurm\n", "executor.kind"),
        ("executor:\n  ray:\n    address: head\n", "executor.ray.address"),
        (
            "executor:\n  ray:\n    resources:\n      x: {gpus: 0, cpu_fallback: false}\n",
            "executor.ray.resources.x",
        ),
        ("cluster:\n  node_name: ../b\n", "cluster.node_name"),
    ],
)
def test_wrong_key_or_value_names_it(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "radgate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value)


def test_the_executor_is_local_unless_ray_is_asked_for_with_its_address() -> None:
    assert Config().executor.kind == "local"
    for address in (None, "auto", "ray://head.hospital.local:10001", "10.0.0.5:6379"):
        ray = Config.model_validate({"executor": {"kind": "ray", "ray": {"address": address}}}).executor.ray
        assert ray.address == address and ray.resources == {} and not ray.shared_paths


def test_a_pipelines_needs_come_from_the_config_else_its_builtin_else_the_default(tmp_path: Path) -> None:
    declared = {"ct-lung": {"cpus": 2, "gpus": 0.5, "gpu_memory_mb": 9000}}
    configured = load_config(_pipelines_config(tmp_path)).model_dump(mode="json")
    config = Config.model_validate({**configured, "executor": {"ray": {"resources": declared}}})
    assert config.pipeline_resources("ct-lung") == Resources(2.0, 0.5, 9000, True)
    assert config.pipeline_resources("bones") == BUILTIN_RESOURCES["monai-bundle"]  # what it is built on
    assert config.pipeline_resources("mr-brain") == BUILTIN_RESOURCES["mr-brain"]
    assert config.pipeline_resources("third-party") == Resources(cpus=1.0, gpus=0.0)


def test_command_line_overrides_are_validated() -> None:
    config = load_config(None).with_overrides(**{"dicom.port": 104, "dicom.ae_title": "NODE2"})
    assert (config.dicom.port, config.dicom.ae_title) == (104, "NODE2")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_config(None).with_overrides(**{"dicom.port": 0})


def test_allowed_peer_matching() -> None:
    config = Config.model_validate(
        {
            "dicom": {
                "allowed_peers": [{"ae_title": "PACS", "address": "10.1.0.0/16"}, {"address": "127.0.0.1"}]
            }
        }
    )
    pacs, local = config.dicom.allowed_peers
    assert pacs.admits("PACS", "10.1.2.3")
    assert not pacs.admits("PACS", "10.2.0.1")
    assert not pacs.admits("OTHER", "10.1.2.3")
    assert local.admits("ANY", "127.0.0.1")


def test_cli_reports_config_error_and_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  prot: 104\n")
    proc = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "studies", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "dicom.prot: unknown key" in proc.stderr


BONE_LABEL = {
    "label": "Bone",
    "category": ["123037004", "SCT", "Anatomical Structure"],
    "type": ["272673000", "SCT", "Bone structure"],
}


def _pipelines_config(tmp_path: Path, **bones: object) -> Path:
    """A config with one configured pipeline `bones` (a folder standing in for a bundle)."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "configs" / "radgate_labels.json").write_text(json.dumps({"1": BONE_LABEL}))
    settings = {"kind": "monai-bundle", "bundle_dir": str(bundle), **bones}
    path = tmp_path / "radgate.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"bones": settings}}))
    return path


def test_a_configured_pipeline_gives_its_kind_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"2": BONE_LABEL}))
    config = load_config(_pipelines_config(tmp_path, labels="labels.json", modalities=["CT"], min_slices=5))
    base, options = config.pipeline_options("bones")
    assert base == "monai-bundle"
    assert options == {  # relative paths are made absolute: workers may run in another folder
        "bundle_dir": tmp_path / "bundle",
        "labels": tmp_path / "labels.json",
        "modalities": ("CT",),
        "min_slices": 5,
    }
    assert config.pipeline_options("ct-lung") == ("ct-lung", {})
    inline = load_config(_pipelines_config(tmp_path, labels={1: BONE_LABEL}))
    assert inline.pipeline_options("bones")[1]["labels"] == {1: BONE_LABEL}
    assert load_config(_pipelines_config(tmp_path)).pipeline_options("bones")[1]["labels"] is None


@pytest.mark.parametrize(
    ("bones", "named"),
    [
        (
            {"bundle_dir": "/no/such/bundle"},
            "pipelines.bones.monai-bundle.bundle_dir: Value error, /no/such/bundle is not",
        ),
        ({"labels": "missing.json"}, "pipelines.bones.monai-bundle: Value error, labels ("),
        ({"labels": {1: {"label": "Bone"}}}, "labels (inline table): label 'Bone' needs a 'category'"),
        ({"labels": {1: "Bone"}}, "pipelines.bones.monai-bundle.labels"),
        ({"labels": {0: BONE_LABEL}}, "label values >= 1"),
        ({"labels": {1: {**BONE_LABEL, "color": [300, 0, 0]}}}, "color must be three integers"),
        ({"kind": "monai-bundel"}, "pipelines.bones: Input tag 'monai-bundel' found using 'kind'"),
        ({"weights": "x.pt"}, "pipelines.bones.monai-bundle.weights: unknown key"),
        ({"min_slices": 0}, "pipelines.bones.monai-bundle.min_slices"),
    ],
)
def test_a_wrong_pipeline_setting_names_its_key(tmp_path: Path, bones: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_pipelines_config(tmp_path, **bones))
    assert named in str(err.value)


def test_a_broken_label_file_in_the_bundle_stops_the_load(tmp_path: Path) -> None:
    path = _pipelines_config(tmp_path)
    (tmp_path / "bundle" / "configs" / "radgate_labels.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bones\.monai-bundle: .*radgate_labels\.json\): Expecting"):
        load_config(path)


_DESTINATIONS = {
    "dicom": {"kind": "dicom", "host": "pacs", "port": 104, "ae_title": "PACS"},
    "dicomweb": {"kind": "dicomweb", "url": "https://pacs/dicom-web"},
    "orthanc": {"kind": "orthanc", "url": "http://orthanc:8042"},
}


@pytest.mark.parametrize("kind", sorted(_DESTINATIONS))
def test_every_destination_kind_takes_a_deidentify_block(tmp_path: Path, kind: str) -> None:
    block = {
        "include_source": True,
        "retain_safe_private": [{"creator": "GEMS_ACQU_01", "group": 0x19, "element": 0x10}],
    }
    path = tmp_path / "radgate.yaml"
    path.write_text(
        yaml.safe_dump({"destinations": {"research": {**_DESTINATIONS[kind], "deidentify": block}}})
    )
    settings = load_config(path).destinations["research"].deidentify
    assert settings is not None and settings.profile == "basic" and settings.include_source
    assert not (
        settings.allow_burned_in or settings.retain_longitudinal_temporal or settings.clean_descriptors
    )
    assert settings.retain_safe_private[0].group == 0x19


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"profile": "full"}, "destinations.research.orthanc.deidentify.profile"),
        ({"retain_dates": True}, "destinations.research.orthanc.deidentify.retain_dates: unknown key"),
        ({"allow_burned_in": "yes"}, "destinations.research.orthanc.deidentify.allow_burned_in"),
        (
            {"retain_safe_private": [{"creator": "X", "group": 0x18, "element": 1}]},
            "retain_safe_private.0.group",
        ),
        (
            {"retain_safe_private": [{"creator": "X", "group": 0x19, "element": 0x100}]},
            "retain_safe_private.0.element",
        ),
        ({"pseudonym_domain": "two words"}, "destinations.research.orthanc.deidentify.pseudonym_domain"),
    ],
)
def test_a_wrong_deidentify_setting_names_its_key(
    tmp_path: Path, block: dict[str, object], named: str
) -> None:
    path = tmp_path / "radgate.yaml"
    path.write_text(
        yaml.safe_dump({"destinations": {"research": {**_DESTINATIONS["orthanc"], "deidentify": block}}})
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value)


def test_a_cluster_puts_spool_incoming_results_and_secret_in_the_shared_dir(tmp_path: Path) -> None:
    alone = Config.model_validate({"data_dir": str(tmp_path / "data")})
    assert (alone.spool_dir, alone.incoming_dir) == (tmp_path / "data/spool", tmp_path / "data/incoming")
    assert (alone.results_dir, alone.secrets_dir) == (tmp_path / "data/results", tmp_path / "data")
    shared = tmp_path / "shared"
    node = Config.model_validate(
        {"data_dir": str(tmp_path / "data"), "cluster": {"shared_dir": str(shared), "node_name": "ct-1"}}
    )
    assert (node.spool_dir, node.incoming_dir) == (shared / "spool", shared / "incoming/ct-1")
    assert (node.results_dir, node.secrets_dir) == (shared / "results", shared)
    assert node.quarantine_dir == tmp_path / "data/quarantine"  # the node's own
