"""The configured sources as `plugin.route.requires` asks them: `plugin.fetch` behind `Archive`."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from plugin.config import Config, SourceConfig
from plugin.fetch import (
    FetchError,
    SeriesMatch,
    StudyMatch,
    find_series,
    find_studies,
    get_fetch,
    request_fetch,
)
from plugin.route.requires import ArchiveUnavailable
from plugin.store.engine import Store
from plugin.store.models import FetchState


class FetchArchive:
    """`plugin.route.requires.Archive` over the config's ``sources`` and the store's fetch requests."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def _source(self, name: str) -> SourceConfig:
        source = self.config.sources.get(name)
        if source is None:
            raise ValueError(f"source {name!r} is not configured")
        return source

    def studies(
        self, source: str, patient_id: str, modality: str | None, before: _dt.date
    ) -> list[StudyMatch]:
        try:
            return find_studies(self._source(source), patient_id=patient_id, modality=modality, before=before)
        except FetchError as err:
            raise ArchiveUnavailable(str(err)) from err

    def series(self, source: str, study_uid: str) -> list[SeriesMatch]:
        try:
            return find_series(self._source(source), study_uid)
        except FetchError as err:
            raise ArchiveUnavailable(str(err)) from err

    def pull(self, source: str, study_uid: str, series_uids: Sequence[str], reason: str) -> int:
        return request_fetch(
            self.store, source, study_uid=study_uid, series_uids=tuple(series_uids), reason=reason
        )

    def pull_failed(self, request_id: int) -> str | None:
        status = get_fetch(self.store, request_id)
        if status is None:
            return f"fetch request {request_id} is gone"
        return (status.error or "failed") if status.state == FetchState.FAILED else None
