"""Findings + the source series → the DICOM result objects a PACS and its viewers show.

    build_results(findings, volume, source_datasets, options) -> ResultSet   (datasets, in memory)
    write_results(findings, volume, source_datasets, out_dir, options) -> list[Path]

Everything is checked before anything is built (`ResultError`): mask grid and source grid, every
`volume.sources[k]` present in `source_datasets`, one source series with study/series/frame of
reference UIDs, no overlap for LABELMAP. Mask slice k goes to the source plane `volume.sources[k]`
names (instance, or frame of a multi-frame instance), never to a list position.
A SEG is written only when some segment is non-empty; the SR is always written (it says what was
not found); SC key images + a report card unless `options.write_sc` is off; a KOS when `write_kos`.
`source_datasets` may be headers only (read with stop_before_pixels): pictures come from the Volume.
Patient and study attributes are copied from the first source through `dicom_io.results.header`:
checked against VR and IOD type, repaired or dropped, one log line per object that needed it.
`dicom_io.testing.structure` summarises any SEG/SR as a viewer sees it (and compares with dcmqi's).
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_io.results.common import ResultOptions, make_context
from dicom_io.results.header import ResultError
from dicom_io.types import Findings, Volume

__all__ = ["ResultError", "ResultOptions", "ResultSet", "build_results", "write_results"]


@dataclass(frozen=True)
class ResultSet:
    """The result objects of one run; `seg` is None when nothing was segmented."""

    seg: Dataset | None
    sr: Dataset
    sc: tuple[Dataset, ...] = ()
    kos: Dataset | None = None

    @property
    def datasets(self) -> list[Dataset]:
        """All objects in the order they should be sent: SEG before the SR that references it."""
        return [d for d in (self.seg, self.sr, *self.sc, self.kos) if d is not None]


def build_results(
    findings: Findings,
    volume: Volume,
    source_datasets: Sequence[Dataset],
    options: ResultOptions | None = None,
    now: _dt.datetime | None = None,
) -> ResultSet:
    """Build SEG, SR, SC (and KOS) datasets; raises ResultError when findings do not fit the sources."""
    # imported here, not above: highdicom and scipy cost a second, and a process that only reads
    # results (`dicom_io.results.reading`, `radgate serve`'s dispatcher) never builds any
    from dicom_io.results.kos import build_kos
    from dicom_io.results.sc import build_sc
    from dicom_io.results.seg import build_seg
    from dicom_io.results.sr import build_sr

    ctx = make_context(findings, volume, source_datasets, options or ResultOptions(), now)
    with warnings.catch_warnings():
        # highdicom warns about one-component person names with the name in the message: no patient data
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        seg = build_seg(ctx)
        sr = build_sr(ctx, seg)
        sc = tuple(build_sc(ctx)) if ctx.options.write_sc else ()
        kos = build_kos(ctx, sc) if ctx.options.write_kos and sc else None
    return ResultSet(seg=seg.dataset if seg else None, sr=sr, sc=sc, kos=kos)


_PREFIX = {"SEG": "SEG", "SR": "SR", "OT": "SC", "KO": "KO"}


def write_results(
    findings: Findings,
    volume: Volume,
    source_datasets: Sequence[Dataset],
    out_dir: Path,
    options: ResultOptions | None = None,
) -> list[Path]:
    """Build the results and write each as a Part 10 file `<kind>-<SOPInstanceUID>.dcm` in out_dir.

    Files appear whole (written to a temporary name, then renamed), so a watcher never sends half a file.
    """
    results = build_results(findings, volume, source_datasets, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in results.datasets:
        kind = _PREFIX.get(str(ds.Modality), str(ds.Modality))
        path = out_dir / f"{kind}-{ds.SOPInstanceUID}.dcm"
        temporary = path.with_suffix(".part")
        ds.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, path)
        paths.append(path)
    return paths
