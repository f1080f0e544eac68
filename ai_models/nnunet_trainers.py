"""Finding nnU-Net's trainer classes without importing every trainer module.

nnU-Net v2 finds the trainer a checkpoint names by importing each module under
``nnunetv2.training.nnUNetTrainer`` in turn until one defines it. Its Primus trainers import timm,
which needs torchvision, and radgate's torch cannot have torchvision (scripts/setup.sh): every
trainer searched after them (``nnUNetTrainerNoMirroring``, TotalSegmentator's) would fail. This
module is the one place that steps around that: it replaces the finder nnU-Net's predictor calls,
for the exact nnunetv2 release it was written against.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path

NNUNET_VERSION = "2.8.1"
"""The nnunetv2 release whose predictor `predictor_finds_trainers` patches (pinned in pyproject)."""


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
    installed = package_version("nnunetv2")
    if installed != NNUNET_VERSION:
        raise RuntimeError(
            f"nnunetv2 {installed} is installed; radgate's nnunet kind is written against {NNUNET_VERSION} "
            f"(ai_models/nnunet_trainers.py): install nnunetv2=={NNUNET_VERSION}"
        )
    from nnunetv2.inference import predict_from_raw_data

    original = predict_from_raw_data.recursive_find_trainer_class_by_name
    predict_from_raw_data.recursive_find_trainer_class_by_name = trainer_class
    try:
        yield
    finally:
        predict_from_raw_data.recursive_find_trainer_class_by_name = original
