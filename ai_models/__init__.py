"""AI pipelines: `Volume` in, `Findings` out; torch/MONAI live here, DICOM does not.

Public API: `Pipeline`, `PipelineError`, `select_device`, `run_pipeline`, `get_pipeline`,
`available_pipelines`, `UnknownPipelineError`.
"""

from ai_models.base import Pipeline, PipelineError, run_pipeline, select_device
from ai_models.registry import UnknownPipelineError, available_pipelines, get_pipeline

__all__ = [
    "Pipeline",
    "PipelineError",
    "UnknownPipelineError",
    "available_pipelines",
    "get_pipeline",
    "run_pipeline",
    "select_device",
]
