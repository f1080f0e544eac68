"""Retrieve a study (or some of its series) from a source into the node.

* C-MOVE: the source sends the instances to ``move_destination`` (the node's own AE title by
  default), so they arrive at the node's storage SCP like any other C-STORE.
* C-GET and WADO-RS: the instances come back to us; each is written to a temporary file in the
  node's incoming folder and stored by `plugin.ingest.receive.Receiver.handle_file`, the same
  durable path as a received C-STORE (fsync, link into the spool, record), as one "association"
  per retrieve that is released at its end, so the study then completes and is routed like one
  that was sent.

Every failure is a `FetchError` in words; a failure status names its code and, for the usual
mistakes (an unknown move destination), what to fix.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from pydicom import Dataset, dcmwrite
from pydicom.errors import InvalidDicomError
from pynetdicom import StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_io.net import STATUS_CANNOT_UNDERSTAND, Peer, file_meta_header
from plugin.config import DEFAULT_AE_TITLE, DicomSource, DicomWebSource, SourceConfig
from plugin.dispatch.base import http_where
from plugin.fetch.query import (
    PENDING,
    FetchError,
    dicom_association,
    dicom_where,
    dicomweb_client,
    dicomweb_error,
    status_words,
)
from plugin.ingest.receive import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, Receiver

log = logging.getLogger(__name__)

FETCH_PREFIX = ".fetch-"
"""Temporary files of C-GET and WADO-RS in the incoming folder (removed by spool recovery)."""

DICOMWEB_PEER = "DICOMWEB"
"""The calling AE title recorded for instances retrieved by WADO-RS."""

MOVE_DESTINATION_UNKNOWN = 0xA801
_retrieves = itertools.count(1)


@dataclass(frozen=True)
class Retrieved:
    """What a retrieve brought: instances the source reports sent (or we stored), and failed."""

    instances: int
    failed: int


def _noop() -> None:
    pass


def _suboperations(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if isinstance(value, int) else 0


def _identifiers(study_uid: str, series_uids: tuple[str, ...]) -> Iterator[Dataset]:
    """The retrieve identifiers: the study, or one per series."""
    for series_uid in series_uids or (None,):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
        ds.StudyInstanceUID = study_uid
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        yield ds


def _last(responses: Iterator[tuple[Dataset, Dataset | None]], progress: Callable[[], None]) -> Dataset:
    """The final response status of a C-MOVE / C-GET (an empty one if none came), after the
    pending ones (``progress`` at each)."""
    final = Dataset()
    for status, _ in responses:
        progress()
        final = status
        if "Status" not in status or int(status.Status) not in PENDING:
            break
    return final


def _final(status: Dataset, service: str, source: DicomSource) -> Retrieved:
    """The outcome of a C-MOVE / C-GET from its final response: counts, or FetchError."""
    where = dicom_where(source)
    code = int(status.Status) if "Status" in status else None
    completed = _suboperations(status, "NumberOfCompletedSuboperations")
    failed = _suboperations(status, "NumberOfFailedSuboperations")
    if code == 0x0000 or (code is not None and code & 0xF000 == 0xB000):  # success, some failed
        return Retrieved(completed, failed)
    reason = status_words(status, service, where)
    if service == "C-MOVE" and code is not None and completed == 0:  # Orthanc: 0xC000, DICOM: 0xA801
        known = "does not know" if code == MOVE_DESTINATION_UNKNOWN else "may not know"
        reason += (
            f"; {where} {known} the move destination {source.move_destination}: declare it there "
            "(AE title, host and port of this node's listener) or set move_destination"
        )
    raise FetchError(reason)


def _move(
    source: DicomSource, study_uid: str, series_uids: tuple[str, ...], progress: Callable[[], None]
) -> Retrieved:
    destination = source.move_destination or source.calling_ae_title or DEFAULT_AE_TITLE
    total = Retrieved(0, 0)
    with dicom_association(source, [build_context(StudyRootQueryRetrieveInformationModelMove)]) as assoc:
        for identifier in _identifiers(study_uid, series_uids):
            responses = assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove)
            got = _final(_last(responses, progress), "C-MOVE", source)
            total = Retrieved(total.instances + got.instances, total.failed + got.failed)
    return total


class _Taker:
    """Stores what a retrieve brings through the receiver, counting it; one peer per retrieve."""

    def __init__(self, receiver: Receiver, incoming: Path, peer: Peer, progress: Callable[[], None]) -> None:
        self.receiver = receiver
        self.incoming = incoming
        self.peer = peer
        self.progress = progress
        self.stored = 0
        self.refused = 0
        self.not_stored = 0  # this node could not take them (disk, database): the retrieve is retried

    def take(self, write: Callable[[Path], None], what: str) -> int:
        """Write one instance with ``write`` to a temporary file and store it: the DICOM status."""
        self.progress()
        path = self.incoming / f"{FETCH_PREFIX}{uuid.uuid4().hex}.dcm"
        try:
            write(path)
        except (ValueError, AttributeError, TypeError) as err:  # a dataset pydicom cannot write back
            path.unlink(missing_ok=True)
            log.warning("%s not taken: cannot be written as a file (%s)", what, err)
            self.refused += 1
            return STATUS_CANNOT_UNDERSTAND
        except OSError:
            path.unlink(missing_ok=True)
            raise
        status = self.receiver.handle_file(path, self.peer, what)
        if status == STATUS_SUCCESS:
            self.stored += 1
            return STATUS_SUCCESS
        if status == STATUS_OUT_OF_RESOURCES:
            self.not_stored += 1
            return status
        self.refused += 1
        return STATUS_CANNOT_UNDERSTAND if status is None else status

    def check(self, study_uid: str) -> None:
        """FetchError when this node could not store some of what came (the log says why)."""
        if self.not_stored:
            raise FetchError(
                f"this node could not store {self.not_stored} instances of study {study_uid} "
                "(disk or database; see the log)"
            )

    def release(self, completed: bool) -> None:
        """The retrieve ended: released (its studies may complete soon) or cut off (they wait)."""
        self.receiver.release(dataclasses.replace(self.peer, released=completed))


def _get(source: DicomSource, study_uid: str, series_uids: tuple[str, ...], taker: _Taker) -> Retrieved:
    where = dicom_where(source)

    def on_store(event: Any) -> int:
        request = event.request
        header = file_meta_header(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            source.ae_title,
        )

        def write(path: Path) -> None:
            with path.open("wb") as f:
                f.write(header)
                f.write(request.DataSet.getvalue())

        try:
            return taker.take(write, f"SOP {request.AffectedSOPInstanceUID} from {where}")
        except OSError:
            return 0xA700

    storage = StoragePresentationContexts[:127]  # with the C-GET context: the 128 DICOM allows
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet), *storage]
    roles = [build_role(str(cx.abstract_syntax), scp_role=True) for cx in storage]
    total = Retrieved(0, 0)
    with dicom_association(source, contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
        for identifier in _identifiers(study_uid, series_uids):
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            got = _final(_last(responses, taker.progress), "C-GET", source)
            total = Retrieved(total.instances + got.instances, total.failed + got.failed)
    return Retrieved(taker.stored, total.failed + taker.refused)


def _writer(ds: Dataset) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        dcmwrite(path, ds, enforce_file_format=True)

    return write


def _wado(source: DicomWebSource, study_uid: str, series_uids: tuple[str, ...], taker: _Taker) -> Retrieved:
    where = http_where(source.url)
    try:
        with dicomweb_client(source) as client:
            for series_uid in series_uids or (None,):
                instances = (
                    client.iter_study(study_uid)
                    if series_uid is None
                    else client.iter_series(study_uid, series_uid)
                )
                for ds in instances:
                    taker.take(_writer(ds), f"SOP {ds.get('SOPInstanceUID', '?')} from {where}")
    except (requests.RequestException, ValueError, InvalidDicomError) as err:  # a part that is no DICOM
        raise dicomweb_error(source, err, "WADO-RS retrieve") from None
    return Retrieved(taker.stored, taker.refused)


def _peer(source: SourceConfig) -> Peer:
    """Who a C-GET or WADO-RS retrieve is recorded as coming from: one association each."""
    association = f"fetch-{next(_retrieves)}"
    if isinstance(source, DicomSource):
        return Peer(source.ae_title, source.host, source.port, association)
    url = urlsplit(source.url)
    return Peer(
        DICOMWEB_PEER, url.hostname or "", url.port or (443 if url.scheme == "https" else 80), association
    )


def retrieve_study(
    source: SourceConfig,
    receiver: Receiver,
    incoming: Path,
    study_uid: str,
    series_uids: tuple[str, ...] = (),
    progress: Callable[[], None] = _noop,
) -> Retrieved:
    """Retrieve study ``study_uid`` (only ``series_uids`` when given) from ``source`` into the node.

    C-GET and WADO-RS store each instance with ``receiver`` through temporary files in ``incoming``
    (on the spool's file system); C-MOVE has the source send them to the node's listener.
    ``progress`` is called at each response or instance (the caller renews its claim there).
    Returns what was retrieved; raises FetchError when the source cannot be reached or refuses,
    OSError when an instance cannot be written here.
    """
    if isinstance(source, DicomSource) and source.retrieve == "move":
        return _move(source, study_uid, series_uids, progress)
    taker = _Taker(receiver, incoming, _peer(source), progress)
    completed = False
    try:
        if isinstance(source, DicomSource):
            retrieved = _get(source, study_uid, series_uids, taker)
        else:
            retrieved = _wado(source, study_uid, series_uids, taker)
        taker.check(study_uid)
        completed = True
        return retrieved
    finally:
        taker.release(completed)
