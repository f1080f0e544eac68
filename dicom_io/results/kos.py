"""A Key Object Selection document that flags the key images, so PACS that honour KOS open them first."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.results.common import Context


def build_kos(ctx: Context, key_images: Sequence[Dataset]) -> hd.ko.KeyObjectSelectionDocument:
    """ "Of Interest" over the key pictures (the SC key images and the report card)."""
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=list(key_images),
        description=f"{ctx.algorithm_name} {ctx.algorithm_version} key images"[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(key_images),
        content=content,
        series_instance_uid=ctx.uid("kos-series"),
        series_number=ctx.series_number_base + 3,
        sop_instance_uid=ctx.uid("kos"),
        instance_number=1,
        manufacturer=ctx.options.manufacturer,
    )
    ctx.stamp(kos, "key objects")
    return kos
