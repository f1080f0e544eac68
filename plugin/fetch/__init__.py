"""Fetch: pull studies from a configured source (a PACS by C-FIND/C-MOVE/C-GET, an archive by
QIDO-RS/WADO-RS) into the node, where they complete and are routed like received studies.

* `plugin.fetch.query`: `find_studies`, `find_series` → `StudyMatch`, `SeriesMatch`; `FetchError`.
* `plugin.fetch.retrieve`: `retrieve_study`, through the node's own ingest path.
* `plugin.fetch.requests`: durable requests (`request_fetch`), the node's `FetchWorker`, the
  completion hook that runs a fetched study's rules or named pipeline once, `submit_fetch`.
"""

from plugin.fetch.query import FetchError, NoMatch, SeriesMatch, StudyMatch, find_series, find_studies
from plugin.fetch.requests import (
    FetchStatus,
    FetchWorker,
    Routing,
    SeveralStudies,
    Submitted,
    UnknownSource,
    completion_hook,
    get_fetch,
    list_fetches,
    request_fetch,
    source_named,
    submit_fetch,
)
from plugin.fetch.retrieve import Retrieved, retrieve_study

__all__ = [
    "FetchError",
    "FetchStatus",
    "FetchWorker",
    "NoMatch",
    "Retrieved",
    "Routing",
    "SeriesMatch",
    "SeveralStudies",
    "StudyMatch",
    "Submitted",
    "UnknownSource",
    "completion_hook",
    "find_series",
    "find_studies",
    "get_fetch",
    "list_fetches",
    "request_fetch",
    "retrieve_study",
    "source_named",
    "submit_fetch",
]
