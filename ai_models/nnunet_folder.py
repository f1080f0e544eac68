"""An nnU-Net v2 trained model folder, read and checked without torch (the node checks it at start).

The folder is what nnU-Net's training writes (`<Trainer>__<Plans>__<configuration>/`) and what
`nnUNetv2_predict_from_modelfolder` reads:

    dataset.json    channel_names (one input channel), labels (name -> value, or regions)
    plans.json      configurations (patch size, spacing, network), intensity properties
    fold_<N>/<checkpoint>   weights per fold (checkpoint_final.pth, or checkpoint_best.pth)

`read_model_folder` checks all of it and says which file and key is wrong (`ModelFolderError`);
`check_label_table` checks a radgate label table against the model's label values. Both run in
`plugin.config` (no torch in the node's main process) and again where the pipeline is built.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_io.labels import LabelSpec

LABELS_FILE = "radgate_labels.json"
"""Where a model folder keeps its radgate label table when the configuration gives none."""
DEFAULT_CHECKPOINT = "checkpoint_final.pth"

Fold = int | str
"""A fold number, or "all" (a model trained on all cases)."""


class ModelFolderError(ValueError):
    """The folder is not a usable nnU-Net v2 trained model; the message names the file and key."""


@dataclass(frozen=True)
class ModelFolder:
    """What radgate needs to know of a trained model folder, checked (see `read_model_folder`).

    label_values: the values the model's label map holds besides background 0, ascending.
    label_names: label value -> the name dataset.json gives it (regions: the region's name).
    channel: the name of its one input channel ("CT" selects nnU-Net's CT normalisation).
    """

    path: Path
    dataset_name: str
    release: str
    configuration: str
    folds: tuple[Fold, ...]
    checkpoint: str
    label_values: tuple[int, ...]
    label_names: Mapping[int, str]
    channel: str

    @property
    def checkpoints(self) -> tuple[Path, ...]:
        return tuple(self.path / f"fold_{fold}" / self.checkpoint for fold in self.folds)

    def digest(self) -> str:
        """The weights' identity: sha256 (first 12 hex) of dataset.json, plans.json and the checkpoints."""
        sha = hashlib.sha256()
        for path in (self.path / "dataset.json", self.path / "plans.json", *self.checkpoints):
            sha.update(path.name.encode())
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    sha.update(chunk)
        return sha.hexdigest()[:12]


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{path.parent} is not an nnU-Net v2 model folder: {path.name} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _resolved(configurations: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One configuration of plans.json with its `inherits_from` chain applied."""
    chain: list[Mapping[str, Any]] = []
    while name not in {str(c.get("_name")) for c in chain}:
        entry = configurations.get(name)
        if not isinstance(entry, Mapping):
            raise ModelFolderError(f"plans.json: configuration {name!r} (inherited) is missing")
        chain.append({**entry, "_name": name})
        parent = entry.get("inherits_from")
        if parent is None:
            break
        name = str(parent)
    resolved: dict[str, Any] = {}
    for entry in reversed(chain):
        resolved.update(entry)
    return resolved


def _configuration(path: Path, plans: Mapping[str, Any], wanted: str | None) -> str:
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping) or not configurations:
        raise ModelFolderError(f"{path / 'plans.json'}: no 'configurations'")
    available = ", ".join(sorted(configurations))
    if wanted is None:
        named = path.name.split("__")  # <trainer>__<plans>__<configuration>, as nnU-Net names it
        if len(named) == 3 and named[2] in configurations:
            wanted = named[2]
        elif len(configurations) == 1:
            wanted = next(iter(configurations))
        else:
            raise ModelFolderError(
                f"{path}: say which configuration the weights were trained with ({available}); "
                "the folder name does not tell (<trainer>__<plans>__<configuration>)"
            )
    if wanted not in configurations:
        raise ModelFolderError(f"{path / 'plans.json'}: no configuration {wanted!r}; it has {available}")
    resolved = _resolved(configurations, wanted)
    if resolved.get("previous_stage"):
        raise ModelFolderError(
            f"{path}: configuration {wanted!r} is a cascade stage (it needs the segmentation of "
            f"{resolved['previous_stage']!r}); radgate runs single-stage configurations only"
        )
    if "patch_size" not in resolved or "architecture" not in resolved:
        raise ModelFolderError(
            f"{path / 'plans.json'}: configuration {wanted!r} has no patch_size/architecture"
        )
    return wanted


def _folds(path: Path, wanted: Sequence[Fold] | None, checkpoint: str) -> tuple[Fold, ...]:
    if wanted is None:
        found = sorted(
            int(d.name.removeprefix("fold_"))
            for d in path.glob("fold_*")
            if d.name.removeprefix("fold_").isdigit() and (d / checkpoint).is_file()
        )
        folds: tuple[Fold, ...] = tuple(found) or (
            ("all",) if (path / "fold_all" / checkpoint).is_file() else ()
        )
        if not folds:
            raise ModelFolderError(f"{path}: no fold_<N>/{checkpoint} (weights) found")
        return folds
    if not wanted:
        raise ModelFolderError(f"{path}: folds is empty")
    for fold in wanted:
        if not (fold == "all" or (isinstance(fold, int) and fold >= 0)):
            raise ModelFolderError(f"fold {fold!r}: a fold is a number >= 0 or 'all'")
        if not (path / f"fold_{fold}" / checkpoint).is_file():
            raise ModelFolderError(f"{path}: fold {fold} has no weights at fold_{fold}/{checkpoint}")
    return tuple(wanted)


def _labels(dataset_file: Path, dataset: Mapping[str, Any]) -> dict[int, str]:
    """Output label value -> name: plain labels, or the regions in regions_class_order."""
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ModelFolderError(f"{dataset_file}: no 'labels'")
    regions = any(isinstance(v, list | tuple) for v in labels.values())
    if regions:
        order = dataset.get("regions_class_order")
        if not isinstance(order, list):
            raise ModelFolderError(f"{dataset_file}: region labels need 'regions_class_order'")
        region_names = [  # as nnU-Net's LabelManager lists them: all but ignore and background
            str(name)
            for name, v in labels.items()
            if name != "ignore" and set(v if isinstance(v, list | tuple) else [v]) != {0}
        ]
        if len(order) != len(region_names):
            raise ModelFolderError(
                f"{dataset_file}: {len(order)} regions_class_order entries for {len(region_names)} regions"
            )
        pairs = list(zip((int(v) for v in order), region_names, strict=True))
    else:
        try:
            pairs = [(int(v), str(name)) for name, v in labels.items() if name != "ignore"]
        except (TypeError, ValueError):
            raise ModelFolderError(
                f"{dataset_file}: label values must be integers, got {dict(labels)}"
            ) from None
        if labels.get("background") != 0:
            raise ModelFolderError(f"{dataset_file}: 'background' must be label 0")
    names = {value: name for value, name in pairs if value != 0}
    if len(names) != len([v for v, _ in pairs if v != 0]):
        raise ModelFolderError(f"{dataset_file}: a label value is used twice")
    return dict(sorted(names.items()))


def _channel(dataset_file: Path, dataset: Mapping[str, Any]) -> str:
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, Mapping) or len(channels) != 1:
        count = len(channels) if isinstance(channels, Mapping) else 0
        raise ModelFolderError(
            f"{dataset_file}: the model takes {count} input channels (channel_names); "
            "radgate gives it one series, so it must take exactly one"
        )
    return str(next(iter(channels.values())))


def input_channel(model_dir: str | Path) -> str:
    """The name of the model's one input channel in its dataset.json (ModelFolderError: not one)."""
    dataset_file = Path(model_dir) / "dataset.json"
    return _channel(dataset_file, _json(dataset_file))


def read_model_folder(
    model_dir: str | Path,
    configuration: str | None = None,
    folds: Sequence[Fold] | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> ModelFolder:
    """Read and check a trained model folder; ModelFolderError names what is missing or wrong.

    configuration: None takes it from the folder name, or the only one in plans.json.
    folds: None takes every fold_<N> holding `checkpoint` (else fold_all), as nnU-Net does.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder (an nnU-Net v2 trained model folder is expected)")
    dataset_file = path / "dataset.json"
    dataset, plans = _json(dataset_file), _json(path / "plans.json")
    channel = _channel(dataset_file, dataset)
    if not re.match(r"^[\w.-]+$", checkpoint):
        raise ModelFolderError(f"checkpoint {checkpoint!r}: a file name, e.g. {DEFAULT_CHECKPOINT}")
    names = _labels(dataset_file, dataset)
    return ModelFolder(
        path=path.resolve(),
        dataset_name=str(plans.get("dataset_name") or dataset.get("name") or path.name),
        release=str(dataset.get("release") or "0"),
        configuration=_configuration(path, plans, configuration),
        folds=_folds(path, folds, checkpoint),
        checkpoint=checkpoint,
        label_values=tuple(names),
        label_names=names,
        channel=channel,
    )


def check_label_table(table: Mapping[int, LabelSpec], model: ModelFolder) -> None:
    """Every value in the table must be one the model outputs (ValueError naming those that are not).

    Model labels without a table entry are allowed: they are left out of the results, with a note.
    """
    unknown = sorted(set(table) - set(model.label_values))
    if unknown:
        have = ", ".join(f"{v} {name}" for v, name in model.label_names.items())
        raise ValueError(
            f"label table values {unknown} are not labels of the model {model.dataset_name} "
            f"(its dataset.json has: {have})"
        )
