"""AI pipelines: `Volume` in, `Findings` out; torch/MONAI live here, DICOM does not.

Public API: `Pipeline`, `PipelineError`, `select_device`, `run_pipeline`, `get_pipeline`,
`available_pipelines`, `UnknownPipelineError`. They are imported on first use, so that
`ai_models.series` (the built-in pipelines' series declarations) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai_models.base import Pipeline, PipelineError, run_pipeline, select_device
    from ai_models.registry import UnknownPipelineError, available_pipelines, get_pipeline

_HOME = {
    "Pipeline": "ai_models.base",
    "PipelineError": "ai_models.base",
    "run_pipeline": "ai_models.base",
    "select_device": "ai_models.base",
    "UnknownPipelineError": "ai_models.registry",
    "available_pipelines": "ai_models.registry",
    "get_pipeline": "ai_models.registry",
}

__all__ = [
    "Pipeline",
    "PipelineError",
    "UnknownPipelineError",
    "available_pipelines",
    "get_pipeline",
    "run_pipeline",
    "select_device",
]


def __getattr__(name: str) -> Any:
    """The public names, imported from their module when first asked for (AttributeError: no such name)."""
    if name not in _HOME:
        raise AttributeError(f"module 'ai_models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
