"""Benchmark: SEG + SR + SC for a 300x512x512 chest CT with three segments, on one core.

    .venv/bin/python bench/results.py [--slices 300] [--size 512] [--overlap]

Prints the time to build and write each object and the SEG size. The goal is <= 3 s for all three
(build + write); the phantom generation and the measurements are not timed. `--overlap` adds the
emphysema segment inside the right lung, which forces highdicom's slower 4-D (overlapping) path.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

import numpy as np  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from dicom_io.results import ResultOptions  # noqa: E402
from dicom_io.results.common import make_context  # noqa: E402
from dicom_io.results.sc import build_sc  # noqa: E402
from dicom_io.results.seg import build_seg  # noqa: E402
from dicom_io.results.sr import build_sr  # noqa: E402
from dicom_io.testing.synthetic import ct_chest_phantom  # noqa: E402
from dicom_io.types import Code, Findings, Measurement, Segment, SourceRef, Volume  # noqa: E402

T = TypeVar("T")
CPU_TIMES: list[float] = []
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
VOLUME, CM3 = Code("118565006", "SCT", "Volume"), Code("cm3", "UCUM", "cubic centimeter")
ATTENUATION, HU = (
    Code("112031", "DCM", "Attenuation Coefficient"),
    Code("[hnsf'U]", "UCUM", "Hounsfield unit"),
)
MEAN = Code("373098007", "SCT", "Mean")
STRUCTURES = {  # truth mask -> (label, property type, laterality, colour)
    "lung_right": (
        "Right lung",
        Code("39607008", "SCT", "Lung"),
        Code("24028007", "SCT", "Right"),
        (80, 160, 255),
    ),
    "lung_left": (
        "Left lung",
        Code("39607008", "SCT", "Lung"),
        Code("7771000", "SCT", "Left"),
        (255, 170, 40),
    ),
    "trachea": ("Trachea", Code("44567001", "SCT", "Trachea"), None, (120, 220, 120)),
    "emphysema": ("Emphysema", Code("87433001", "SCT", "Pulmonary emphysema"), None, (230, 60, 60)),
}


def timed(label: str, action: Callable[[], T]) -> tuple[T, float]:
    """Run and print wall and CPU time: on a shared machine the CPU time is the steadier figure."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = action()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    CPU_TIMES.append(cpu)
    print(f"  {label:<28} {elapsed:6.2f} s wall {cpu:6.2f} s CPU")
    return result, elapsed


def save(datasets: list[Dataset], directory: Path) -> int:
    total = 0
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--overlap", action="store_true", help="add emphysema inside the right lung")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    phantom = ct_chest_phantom(args.size, args.size, args.slices)
    volume = Volume(
        phantom.voxels,
        phantom.affine,
        tuple(SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in phantom.datasets),
        {"Modality": "CT"},
    )
    names = ["lung_right", "lung_left", "emphysema" if args.overlap else "trachea"]
    segments, measurements = [], []
    for number, name in enumerate(names, start=1):
        label, kind, laterality, colour = STRUCTURES[name]
        mask = phantom.truth[name]
        segments.append(Segment(number, label, ANATOMY, kind, mask, laterality=laterality, color_rgb=colour))
        measurements += [
            Measurement(VOLUME, round(float(mask.sum()) * volume.voxel_volume_ml, 2), CM3, number),
            Measurement(ATTENUATION, round(float(phantom.voxels[mask].mean()), 1), HU, number, MEAN),
        ]
    findings = Findings("ct-lung", "1.0.0", volume.shape, tuple(segments), tuple(measurements))

    print(f"results bench: {args.slices}x{args.size}x{args.size}, segments {names}, one core")
    ctx, t_check = timed(
        "check inputs", lambda: make_context(findings, volume, phantom.datasets, ResultOptions())
    )
    seg, t_seg = timed("SEG build", lambda: build_seg(ctx))
    assert seg is not None
    sr, t_sr = timed("SR build", lambda: build_sr(ctx, seg))
    sc, t_sc = timed("SC build (key image + card)", lambda: build_sc(ctx))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        seg_bytes, t_seg_w = timed("SEG write", lambda: save([seg.dataset], out))
        _, t_sr_w = timed("SR write", lambda: save([sr], out))
        _, t_sc_w = timed("SC write", lambda: save(list(sc), out))
    total = t_check + t_seg + t_sr + t_sc + t_seg_w + t_sr_w + t_sc_w
    print(f"  SEG: {int(seg.dataset.NumberOfFrames)} frames, {seg_bytes / 2**20:.1f} MiB")
    print(
        f"  total {total:.2f} s wall, {sum(CPU_TIMES):.2f} s CPU (goal <= 3 s), load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {platform.machine()}, numpy {np.__version__}"
    )


if __name__ == "__main__":
    main()
