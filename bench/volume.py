"""Benchmark: series → Volume with dicom_io.volume versus plain pydicom one file at a time.

Writes a synthetic chest CT (dicom_io.testing.synthetic, default 300 slices of 512x512) into a temporary
folder, uncompressed and JPEG 2000 lossless, then loads each variant in a fresh Python process so
that peak memory (VmHWM) belongs to that variant alone ("base": resident after imports, before
loading; "worker": the largest decoding worker process, if any). Variants marked "1 core" are pinned
to one CPU. Files are in the page cache (just written): this measures parsing and decoding, not disk.
Prints wall and CPU seconds (CPU time includes decoding workers and is the steadier figure on a
shared machine; the header shows the load average); never fails on time.
Run: .venv/bin/python bench/volume.py [--slices N] [--size N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "radgate, uncompressed, 1 core": ("radgate", "plain", 1),
    "  of which header pass (group_series)": ("headers", "plain", 1),
    "pydicom one-by-one, uncompressed, 1 core": ("pydicom", "plain", 1),
    "radgate, J2K lossless, 1 core": ("radgate", "j2k", 1),
    "radgate, J2K lossless, 2 processes": ("radgate", "j2k", 2),
    "pydicom one-by-one, J2K lossless, 1 core": ("pydicom", "j2k", 1),
    "pydicom pixel_array only, 1 thread, J2K": ("threads", "j2k", 1),
    "pydicom pixel_array only, 2 threads, J2K": ("threads", "j2k", 2),
}


def pydicom_one_by_one(folder: Path) -> npt.NDArray[Any]:
    """What a script typically does: dcmread + pixel_array + rescale per file, sort by position, stack."""
    from pydicom import dcmread

    planes = []
    for path in folder.iterdir():
        ds = dcmread(path)
        cosines = np.asarray(ds.ImageOrientationPatient, dtype=float)
        along = float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(cosines[:3], cosines[3:]))
        planes.append((along, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)))
    planes.sort(key=lambda item: item[0])
    return np.stack([plane for _, plane in planes])


def decode_in_threads(folder: Path, threads: int) -> npt.NDArray[Any]:
    """Decode only, in a thread pool: shows whether the codec releases the GIL (it scales if it does)."""
    from concurrent.futures import ThreadPoolExecutor

    from pydicom.pixels import pixel_array

    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(pixel_array, sorted(folder.iterdir()))))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (decoding workers): robust to a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc (VmHWM, unlike ru_maxrss, is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def run_one(tool: str, folder: Path, workers: int, repeats: int) -> dict[str, float]:
    """Load `folder` `repeats` times in this process; best time and peak resident memory."""
    if workers == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from dicom_io.volume import group_series, load_series

    baseline_mb = status_mb("VmRSS")
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        if tool == "radgate":
            result: object = load_series([folder], workers=workers).voxels
        elif tool == "headers":
            result = group_series([folder])
        elif tool == "threads":
            result = decode_in_threads(folder, workers)
        else:
            result = pydicom_one_by_one(folder)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, cpu_seconds() - start_cpu)
        del result
    peak_mb = status_mb("VmHWM")
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "seconds": best,
        "cpu": best_cpu,
        "peak_mb": peak_mb,
        "baseline_mb": baseline_mb,
        "worker_mb": worker_mb,
    }


def write_series(root: Path, slices: int, size: int) -> dict[str, Path]:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from dicom_io.testing.synthetic import ct_chest_phantom

    folders = {}
    for name, syntax in (("plain", ExplicitVRLittleEndian), ("j2k", JPEG2000Lossless)):
        start = time.perf_counter()
        series = ct_chest_phantom(rows=size, columns=size, slices=slices, transfer_syntax=syntax)
        folders[name] = root / name
        series.write(folders[name])
        print(f"wrote {slices} x {size}² {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return folders


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for uncompressed variants")
    parser.add_argument(
        "--child", nargs=4, metavar=("TOOL", "FOLDER", "WORKERS", "REPEATS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        tool, folder, workers, repeats = args.child
        print(json.dumps(run_one(tool, Path(folder), int(workers), int(repeats))))
        return
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{when}, {cpu_model()}, {os.cpu_count()} CPUs, load {load}")
    with tempfile.TemporaryDirectory(prefix="radgate-bench-volume-") as tmp:
        folders = write_series(Path(tmp), args.slices, args.size)
        print(f"{'variant':44} {'time s':>7} {'cpu s':>7} {'peak MB':>8} {'base MB':>8} {'worker MB':>9}")
        for label, (tool, kind, workers) in VARIANTS.items():
            repeats = args.repeats if kind == "plain" else 1
            command = [
                sys.executable,
                __file__,
                "--child",
                tool,
                str(folders[kind]),
                str(workers),
                str(repeats),
            ]
            done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{label:44} {result['seconds']:7.2f} {result['cpu']:7.2f} {result['peak_mb']:8.0f} "
                f"{result['baseline_mb']:8.0f} "
                f"{result['worker_mb']:9.0f}"
            )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
