"""Query a source: C-FIND (Study Root, study and series level) or QIDO-RS, into plain matches.

The network code is thin: one association (or one HTTP request) per query, pynetdicom's and
dicomweb-client's public API only. Every failure is a `FetchError` whose message says what went
wrong in words an operator can act on (connection refused, association rejected, a failure status);
an empty answer is not an error (an empty list). No patient data goes into a message or a log line.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.status import code_to_category

from plugin.config import DEFAULT_AE_TITLE, DicomSource, DicomWebSource, SourceConfig
from plugin.dispatch.base import describe_network_error, http_status, http_where, redact, url_secrets
from plugin.dispatch.dicom import associate
from plugin.dispatch.dicomweb import auth_secrets, http_session

PENDING = (0xFF00, 0xFF01)


class FetchError(RuntimeError):
    """A source could not be queried or retrieved from; the message says why (no patient data)."""


class NoMatch(FetchError):
    """The source answered, and no study matches what was asked for."""


@dataclass(frozen=True)
class StudyMatch:
    """One study a source holds, as its C-FIND / QIDO-RS answer describes it."""

    study_uid: str
    accession: str | None
    patient_id: str
    study_date: datetime.date | None
    modalities: tuple[str, ...]
    description: str | None


@dataclass(frozen=True)
class SeriesMatch:
    """One series of a study a source holds."""

    series_uid: str
    modality: str | None
    description: str | None
    number: int | None
    instance_count: int | None


# --- what the answers hold -------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    try:
        return None if text is None else int(float(text))
    except ValueError:
        return None


def _date(ds: Dataset, keyword: str) -> datetime.date | None:
    text = _text(ds, keyword)
    if text is None or len(text) != 8 or not text.isdigit():
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _modalities(ds: Dataset) -> tuple[str, ...]:
    value = ds.get("ModalitiesInStudy")
    if value is None or value == "":
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in values if str(v).strip())


def study_match(ds: Dataset) -> StudyMatch | None:
    """The match a study-level answer describes; None when it carries no Study Instance UID."""
    study_uid = _text(ds, "StudyInstanceUID")
    if study_uid is None:
        return None
    return StudyMatch(
        study_uid=study_uid,
        accession=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID") or "",
        study_date=_date(ds, "StudyDate"),
        modalities=_modalities(ds),
        description=_text(ds, "StudyDescription"),
    )


def series_match(ds: Dataset) -> SeriesMatch | None:
    """The match a series-level answer describes; None when it carries no Series Instance UID."""
    series_uid = _text(ds, "SeriesInstanceUID")
    if series_uid is None:
        return None
    return SeriesMatch(
        series_uid=series_uid,
        modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"),
        number=_int(ds, "SeriesNumber"),
        instance_count=_int(ds, "NumberOfSeriesRelatedInstances"),
    )


STUDY_KEYS = (
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
    "StudyDate",
    "ModalitiesInStudy",
    "StudyDescription",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)


def study_filters(
    *,
    patient_id: str | None,
    accession: str | None,
    study_uid: str | None,
    modality: str | None,
    before: datetime.date | None,
) -> dict[str, str]:
    """The study-level matching keys (DICOM keyword -> value); ``before`` is a date range that
    ends the day before (studies strictly before it)."""
    filters = {
        "PatientID": patient_id,
        "AccessionNumber": accession,
        "StudyInstanceUID": study_uid,
        "ModalitiesInStudy": modality,
        "StudyDate": None if before is None else f"-{(before - datetime.timedelta(days=1)):%Y%m%d}",
    }
    given = {keyword: value for keyword, value in filters.items() if value}
    if not given:
        raise ValueError(
            "a study query needs at least one of patient_id, accession, study_uid, modality, before"
        )
    return given


def _keep(match: StudyMatch, modality: str | None, before: datetime.date | None) -> bool:
    """Check what a PACS may have ignored: the modality and the date range."""
    if modality is not None and match.modalities and modality not in match.modalities:
        return False
    return before is None or (match.study_date is not None and match.study_date < before)


# --- DICOM: C-FIND -------------------------------------------------------------------------------


def dicom_where(source: DicomSource) -> str:
    return f"{source.ae_title}@{source.host}:{source.port}"


@contextmanager
def dicom_association(
    source: DicomSource,
    contexts: list[PresentationContext],
    roles: list[Any] | None = None,
    handlers: list[tuple[evt.NotificationEvent | evt.InterventionEvent, Callable[..., Any]]] | None = None,
) -> Iterator[Association]:
    """An established association with the source proposing ``contexts`` (and SCP/SCU ``roles``,
    event ``handlers``), released on leaving; FetchError when there is none."""
    assoc, failure = associate(
        source.host,
        source.port,
        source.ae_title,
        source.calling_ae_title or DEFAULT_AE_TITLE,
        contexts,
        source.timeout_s,
        source.tls,
        roles,
        list(handlers or ()),
    )
    if assoc is None:
        raise FetchError(failure or f"no association with {dicom_where(source)}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def status_words(status: Dataset, service: str, where: str) -> str:
    """A failure or missing response status in words: the code, its category, the error comment."""
    if "Status" not in status:
        return f"no {service} response from {where} (timeout, abort or invalid response)"
    code = int(status.Status)
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    return f"{service} status 0x{code:04X} ({code_to_category(code)}) from {where}{comment}"


def c_find(source: DicomSource, level: str, keys: dict[str, str], returned: tuple[str, ...]) -> list[Dataset]:
    """One Study Root C-FIND at ``level``: the identifiers of every pending response."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword in returned:
        setattr(query, keyword, "")
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    where = dicom_where(source)
    answers: list[Dataset] = []
    with dicom_association(source, [build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.Status) if "Status" in status else None
            if code in PENDING:
                if identifier is not None:
                    answers.append(identifier)
                continue
            if code != 0x0000:
                raise FetchError(status_words(status, "C-FIND", where))
    return answers


# --- DICOMweb: QIDO-RS -----------------------------------------------------------------------------


@contextmanager
def dicomweb_client(source: DicomWebSource) -> Iterator[DICOMwebClient]:
    """A DICOMweb client for the source, its credentials in its session, its timeout on every
    request; the session is closed on leaving."""
    with http_session(source.auth) as session:
        yield DICOMwebClient(source.url, session=session, timeout=source.timeout_s)


def dicomweb_secrets(source: DicomWebSource) -> list[str]:
    """Every credential a DICOMweb source carries, for ``redact``."""
    return url_secrets(source.url) + auth_secrets(source.auth)


def dicomweb_error(source: DicomWebSource, err: Exception, what: str) -> FetchError:
    """A FetchError for a failed DICOMweb request, with its status or network error, redacted."""
    where = http_where(source.url)
    if isinstance(err, requests.HTTPError) and err.response is not None:
        reason = f"{what}: {http_status(err.response, where)}"
    elif isinstance(err, requests.RequestException | OSError):
        reason = f"{what}: {describe_network_error(err, where)}"
    else:
        reason = f"{what} from {where}: {type(err).__name__}: {err}"
    return FetchError(redact(reason, dicomweb_secrets(source)))


def _qido(
    source: DicomWebSource, what: str, search: Callable[[DICOMwebClient], list[dict[str, Any]]]
) -> list[Dataset]:
    try:
        with dicomweb_client(source) as client:
            return [Dataset.from_json(answer) for answer in search(client)]
    except (requests.RequestException, OSError, ValueError, TypeError, KeyError) as err:
        raise dicomweb_error(source, err, what) from None


# --- the API ---------------------------------------------------------------------------------------


def find_studies(
    source: SourceConfig,
    *,
    patient_id: str | None = None,
    accession: str | None = None,
    study_uid: str | None = None,
    modality: str | None = None,
    before: datetime.date | None = None,
) -> list[StudyMatch]:
    """The studies at ``source`` that match every key given (``before``: study date strictly
    before it), newest first (undated last). An empty list when none match.

    Raises ValueError when no key is given, FetchError when the source cannot be queried.
    """
    keys = study_filters(
        patient_id=patient_id, accession=accession, study_uid=study_uid, modality=modality, before=before
    )
    if isinstance(source, DicomSource):
        answers = c_find(source, "STUDY", keys, STUDY_KEYS)
    else:
        answers = _qido(
            source,
            "QIDO-RS study query",
            lambda client: client.search_for_studies(search_filters=keys, fields=list(STUDY_KEYS)),
        )
    matches = [m for ds in answers if (m := study_match(ds)) is not None and _keep(m, modality, before)]
    unique = {m.study_uid: m for m in matches}
    return sorted(unique.values(), key=lambda m: m.study_date or datetime.date.min, reverse=True)


def find_series(source: SourceConfig, study_uid: str) -> list[SeriesMatch]:
    """The series of study ``study_uid`` at ``source``, by series number. Empty when it has none
    (or the source does not hold the study). Raises FetchError when the source cannot be queried."""
    if isinstance(source, DicomSource):
        answers = c_find(source, "SERIES", {"StudyInstanceUID": study_uid}, SERIES_KEYS)
    else:
        answers = _qido(
            source,
            "QIDO-RS series query",
            lambda client: client.search_for_series(study_uid, fields=list(SERIES_KEYS)),
        )
    matches = {m.series_uid: m for ds in answers if (m := series_match(ds)) is not None}
    return sorted(matches.values(), key=lambda m: (m.number is None, m.number or 0, m.series_uid))
