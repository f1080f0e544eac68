"""The series each pipeline wants (`dicom_io.selection.SeriesWanted`), as routing asks for it.

Built-in pipelines (and names configured on them under `pipelines`) are read from
`ai_models.series.BUILTIN_SERIES`, which needs no torch, so the Orthanc plugin ranks series in
Orthanc's process like the node does. A third-party pipeline declares `series` on itself and is
built from the registry to read it; where pipelines must not be imported (inside Orthanc) it gets
the common order (`ANY_SERIES`), with one log line.
"""

from __future__ import annotations

import logging
from functools import cache

from ai_models.registry import UnknownPipelineError, available_pipelines
from ai_models.series import BUILTIN_SERIES
from dicom_io.selection import ANY_SERIES, SeriesWanted
from plugin.config import Config
from plugin.route.rules import DEFAULT_RULES, SeriesLookup

log = logging.getLogger(__name__)


def declaration(config: Config, name: str, *, import_pipelines: bool = True) -> SeriesWanted:
    """The series `name` (a registered pipeline or one configured under `pipelines`) wants.

    Raises `ai_models.UnknownPipelineError` (a LookupError) when no such pipeline is installed.
    """
    kind, options = config.pipeline_options(name)
    builtin = BUILTIN_SERIES.get(kind)
    if builtin is not None:
        return builtin(**options)
    if import_pipelines:
        from ai_models.base import declared_series
        from ai_models.registry import get_pipeline

        return declared_series(get_pipeline(kind, **options))
    available = available_pipelines()
    if kind not in available:
        raise UnknownPipelineError(f"no pipeline named {name!r}; available: {', '.join(available)}")
    log.info("pipeline %r: its series declaration is not read here; the common order applies", name)
    return ANY_SERIES


def series_lookup(config: Config, *, import_pipelines: bool = True) -> SeriesLookup:
    """`declaration` for each pipeline, once per name."""

    @cache
    def lookup(name: str) -> SeriesWanted:
        return declaration(config, name, import_pipelines=import_pipelines)

    return lookup


def named_pipelines(config: Config) -> set[str]:
    """The pipelines the routing rules name (the shipped rules when the config has none)."""
    rules = DEFAULT_RULES if config.rules is None else config.rules
    names = {rule.pipeline for rule in rules}
    return names | ({config.default_rule.pipeline} if config.default_rule else set())


def known_pipelines(config: Config) -> set[str]:
    """The pipeline names an on-demand run (the Orthanc plugin's run route, the console's re-run) may
    ask for: those installed in this process, those configured under ``pipelines`` and those the
    rules name (a worker elsewhere may hold pipelines this process lacks; ``radgate worker``
    checks the rules' at its start)."""
    return set(available_pipelines()) | set(config.pipelines) | named_pipelines(config)
