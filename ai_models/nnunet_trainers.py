"""The one place that steps around nnU-Net's own code, for the exact nnunetv2 release it was written
against (`NNUNET_VERSION`, pinned in pyproject): two functions its predictor calls are replaced.

* Finding trainer classes without importing every trainer module. nnU-Net v2 finds the trainer a
  checkpoint names by importing each module under ``nnunetv2.training.nnUNetTrainer`` in turn until
  one defines it. Its Primus trainers import timm, which needs torchvision, and radgate's torch
  cannot have torchvision (scripts/setup.sh): every trainer searched after them
  (``nnUNetTrainerNoMirroring``, TotalSegmentator's) would fail.
* Listing a folder's cases in this process. ``predict_from_files`` (TotalSegmentator's path) lists
  them with a pool of 12 forked processes: a fork of a process that runs other threads (a Ray
  actor's gRPC threads) can hang the child, and the pool's exit then waits for it forever.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path

NNUNET_VERSION = "2.8.1"
"""The nnunetv2 release whose predictor this module patches (pinned in pyproject)."""


def trainer_class(name: str) -> type:
    """nnU-Net's trainer class ``name``, importing only the module that defines it.

    Raises LookupError when no module of nnU-Net's trainer package defines it.
    """
    import nnunetv2

    package = Path(nnunetv2.__file__).parent
    pattern = re.compile(rf"^class {re.escape(name)}\b", re.MULTILINE)
    for path in sorted((package / "training" / "nnUNetTrainer").rglob("*.py")):
        if pattern.search(path.read_text(encoding="utf-8")):
            module = ".".join(("nnunetv2", *path.relative_to(package).with_suffix("").parts))
            found: type = getattr(importlib.import_module(module), name)
            return found
    raise LookupError(f"nnU-Net has no trainer class {name!r}")


@contextlib.contextmanager
def predictor_finds_trainers() -> Iterator[None]:
    """Within: ``nnUNetPredictor.initialize_from_trained_model_folder`` finds a checkpoint's trainer
    with `trainer_class`. Raises RuntimeError when the installed nnunetv2 is not `NNUNET_VERSION`."""
    with _predictor_calls("recursive_find_trainer_class_by_name", trainer_class):
        yield


def cases_in_folder(
    folder: str, file_ending: str, identifiers: list[str] | None = None, num_processes: int = 12
) -> list[list[str]]:
    """nnU-Net's ``create_lists_from_splitted_dataset_folder`` in this process (``num_processes``,
    its pool's size, is ignored): for each case identifier, its channel files in ``folder``."""
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    if identifiers is None:
        identifiers = list(get_identifiers_from_splitted_dataset_folder(folder, file_ending))
    files = subfiles(folder, suffix=file_ending, join=False, sort=True)
    return [create_paths_fn(folder, files, file_ending, case) for case in identifiers]


@contextlib.contextmanager
def predictor_lists_cases_in_process() -> Iterator[None]:
    """Within: ``nnUNetPredictor.predict_from_files`` lists a folder's cases with `cases_in_folder`,
    forking no process. Raises RuntimeError when the installed nnunetv2 is not `NNUNET_VERSION`."""
    with _predictor_calls("create_lists_from_splitted_dataset_folder", cases_in_folder):
        yield


@contextlib.contextmanager
def _predictor_calls(name: str, replacement: object) -> Iterator[None]:
    """Within: nnU-Net's predictor module calls ``replacement`` for its function ``name``."""
    installed = package_version("nnunetv2")
    if installed != NNUNET_VERSION:
        raise RuntimeError(
            f"nnunetv2 {installed} is installed; radgate's nnU-Net pipelines are written against "
            f"{NNUNET_VERSION} (ai_models/nnunet_trainers.py): install nnunetv2=={NNUNET_VERSION}"
        )
    from nnunetv2.inference import predict_from_raw_data

    original = getattr(predict_from_raw_data, name)
    setattr(predict_from_raw_data, name, replacement)
    try:
        yield
    finally:
        setattr(predict_from_raw_data, name, original)
