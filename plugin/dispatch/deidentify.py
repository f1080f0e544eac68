"""The step before a sender for a destination with ``deidentify``: de-identified copies of a batch.

Each file of the batch is read, checked for burned-in annotation, de-identified
(`dicom_io.deidentify`, pseudonyms from the job store) and written to a temporary folder the caller
owns; the results and the spool on disk are never changed. The copies go to the sender under
their new SOP Instance UIDs; the delivery rows keep the originals'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_io.deidentify import Options, Pseudonymizer, deidentify
from dicom_io.results.common import REPORT_CARD
from plugin.config import Deidentify
from plugin.dispatch.base import Outcomes, Outgoing, missing_file


@dataclass
class Prepared:
    """The de-identified batch: what to send, what failed (retried), what is refused (DEAD at once)."""

    items: list[Outgoing] = field(default_factory=list)
    failed: Outcomes = field(default_factory=dict)
    refused: Outcomes = field(default_factory=dict)


def options_of(settings: Deidentify) -> Options:
    """The `dicom_io.deidentify.Options` a destination's ``deidentify`` block asks for."""
    return Options(
        retain_longitudinal_temporal=settings.retain_longitudinal_temporal,
        retain_patient_characteristics=settings.retain_patient_characteristics,
        clean_descriptors=settings.clean_descriptors,
        safe_private=frozenset((p.creator, p.group, p.element) for p in settings.retain_safe_private),
    )


def refusal(ds: Dataset, ours: bool, settings: Deidentify) -> str | None:
    """Why ``ds`` must not leave de-identified, or None.

    BurnedInAnnotation YES is refused unless ``allow_burned_in``, except radgate's own key images
    (``ours``: their text is segment labels, orientation letters, the algorithm and the slice
    number); radgate's report card shows the day it was made, so it goes only with dates retained.
    """
    if settings.allow_burned_in or str(ds.get("BurnedInAnnotation", "")).upper() != "YES":
        return None
    if not ours:
        return "BurnedInAnnotation YES: not exported de-identified (deidentify.allow_burned_in is false)"
    if ds.get("ImageComments") == REPORT_CARD and not settings.retain_longitudinal_temporal:
        return (
            "the report card shows the date it was made in its pixels: not exported de-identified "
            "without deidentify.retain_longitudinal_temporal"
        )
    return None


def prepare(
    items: Sequence[Outgoing],
    settings: Deidentify,
    names: Pseudonymizer,
    results_dir: Path,
    into: Path,
) -> Prepared:
    """De-identified copies of ``items`` in ``into`` (named by delivery id), with the outcomes so far.

    A missing or unreadable file fails its delivery (retried like any failure); a refused one
    (`refusal`) is reported in ``refused``. Raises only for a store error from ``names``.
    """
    prepared = Prepared()
    options = options_of(settings)
    results = results_dir.resolve()
    for item in items:
        missing = missing_file(item)
        if missing is not None:
            prepared.failed[item.delivery_id] = missing
            continue
        try:
            ds = dcmread(item.path)
        except (InvalidDicomError, OSError, ValueError) as err:
            prepared.failed[item.delivery_id] = f"cannot read for de-identification: {type(err).__name__}"
            continue
        reason = refusal(ds, item.path.resolve().is_relative_to(results), settings)
        if reason is not None:
            prepared.refused[item.delivery_id] = reason
            continue
        out = into / f"{item.delivery_id}.dcm"
        try:
            deidentify(ds, options, names)
            ds.save_as(out, enforce_file_format=True)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
            prepared.failed[item.delivery_id] = f"cannot de-identify: {type(err).__name__}"
            continue
        prepared.items.append(Outgoing(item.delivery_id, str(ds.SOPInstanceUID), out))
    return prepared
