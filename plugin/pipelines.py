"""The series each pipeline wants (`dicom_io.selection.SeriesWanted`), as routing asks for it.

A pipeline declares them on itself (`series`, read by `ai_models.base.declared_series`), so the
declaration is had by building the pipeline from the registry, which imports torch. The node and
the CLI do that in their own process (`series_lookup`). The Orthanc plugin must not load torch in
Orthanc's process, so it asks a child Python process once per set of names (`child_series_lookup`,
which runs this module: ``python -m plugin.pipelines NAME...`` with the radgate configuration's
`pipelines` section on stdin, the declarations as JSON on stdout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from dicom_io.selection import SeriesWanted
from plugin.config import Config, ConfigError
from plugin.route import SeriesLookup

CHILD_TIMEOUT_S = 120.0
"""How long the child process may take (it imports torch and builds the pipelines)."""


def declaration(config: Config, name: str) -> SeriesWanted:
    """The series `name` (a registered pipeline or one configured under `pipelines`) wants.

    Raises `ai_models.UnknownPipelineError` when no such pipeline is installed.
    """
    from ai_models.base import declared_series
    from ai_models.registry import get_pipeline

    kind, options = config.pipeline_options(name)
    return declared_series(get_pipeline(kind, **options))


def series_lookup(config: Config) -> SeriesLookup:
    """Declarations built in this process, each pipeline once."""

    @cache
    def lookup(name: str) -> SeriesWanted:
        return declaration(config, name)

    return lookup


def _from_json(data: dict[str, Any]) -> SeriesWanted:
    tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
    return SeriesWanted(**{**data, **tuples})


class ChildSeriesLookup:
    """Declarations from a child Python process (see the module doc); cached, thread-safe.

    Raises LookupError when the pipeline asked for is not installed, ConfigError when the child
    cannot run (no such Python, a broken environment).
    """

    def __init__(self, config: Config, python: Path, names: Iterable[str] = ()) -> None:
        self.config = config
        self.python = python
        self.names = tuple(names)  # asked for together with the first name, so one child does
        self._known: dict[str, SeriesWanted] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> SeriesWanted:
        with self._lock:
            if name not in self._known:
                wanted = [name, *(n for n in self.names if n != name and n not in self._known)]
                self._known.update(self._ask(wanted))
            return self._known[name]

    def _ask(self, names: Sequence[str]) -> dict[str, SeriesWanted]:
        repo = Path(__file__).resolve().parents[1]
        section = self.config.model_dump(mode="json", include={"pipelines"})
        done = subprocess.run(
            [str(self.python), "-m", "plugin.pipelines", *names],
            input=json.dumps(section),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env={**os.environ, "PYTHONPATH": str(repo)},
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ConfigError(f"cannot read the pipelines' series declarations ({self.python}): {tail}")
        answer = json.loads(done.stdout)
        if "error" in answer[names[0]]:
            raise LookupError(answer[names[0]]["error"])
        return {n: _from_json(d) for n, d in answer.items() if "error" not in d}


def main(argv: Sequence[str]) -> int:
    """The child: names in argv, the `pipelines` section as JSON on stdin; JSON on stdout."""
    config = Config.model_validate(json.loads(sys.stdin.read() or "{}"))
    answer: dict[str, Any] = {}
    for name in argv:
        try:
            answer[name] = dataclasses.asdict(declaration(config, name))
        except Exception as err:  # the parent reports it; one bad name must not hide the others
            answer[name] = {"error": f"pipeline {name!r}: {err}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
