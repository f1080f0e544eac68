"""Pipeline benchmark: ct-lung on a 300x512x512 chest phantom, mr-brain on the real MPRAGE.

Each measurement runs in its own process so that its peak resident memory (ru_maxrss from
os.wait4) is its own; torch's allocations are invisible to tracemalloc. On CUDA the peak GPU
memory (torch.cuda.max_memory_allocated) is printed too. Prints figures, never fails on time.

    .venv/bin/python bench/pipelines.py [--only ct-lung|mr-brain] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MPRAGE = "mr-brain-t1-mprage"


def _testdata() -> Path:
    return Path(os.environ.get("RADGATE_TESTDATA") or ROOT.parent / "shared" / "testdata")


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _prepare_phantom(folder: Path) -> None:
    """Generate the big phantom once (outside the measured process) and keep voxels + affine."""
    from dicom_io.testing.synthetic import ct_chest_phantom

    series = ct_chest_phantom(rows=512, columns=512, slices=300, seed=0)
    np.save(folder / "voxels.npy", series.voxels.astype(np.int16))
    np.save(folder / "affine.npy", series.affine)
    lungs = series.truth["lung_right"] | series.truth["lung_left"]
    np.save(folder / "truth_ml.npy", np.array([float(lungs.sum()) * series.voxel_volume_ml]))


def _measure(pipeline: str, phantom_dir: Path | None, device_name: str | None, threads: int) -> None:
    """Child process: load the input, run the pipeline once, print one JSON line."""
    import torch

    from ai_models import get_pipeline, run_pipeline, select_device
    from dicom_io.types import SourceRef, Volume

    torch.set_num_threads(threads)
    device = torch.device(device_name) if device_name else select_device()
    started = time.perf_counter()
    if pipeline == "ct-lung":
        assert phantom_dir is not None
        voxels = np.load(phantom_dir / "voxels.npy")
        refs = tuple(SourceRef("1.2.840.10008.5.1.4.1.1.2", f"2.25.{k}") for k in range(voxels.shape[0]))
        volume = Volume(voxels, np.load(phantom_dir / "affine.npy"), refs, {"Modality": "CT"})
    else:
        from dicom_io.volume import load_series

        volume = load_series([_testdata() / MPRAGE])
    load_s = time.perf_counter() - started
    model = get_pipeline(pipeline)
    run_s: list[float] = []
    cpu_s: list[float] = []  # CPU time of all threads: what the run costs on a machine shared with others
    for _ in range(2):  # first run: cold (weights, CUDA kernels); second: a long-lived worker's later jobs
        started, cpu_started = time.perf_counter(), time.process_time()
        findings = run_pipeline(model, volume, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        run_s.append(time.perf_counter() - started)
        cpu_s.append(time.process_time() - cpu_started)
    result = {
        "pipeline": pipeline,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "shape": list(volume.shape),
        "load_s": round(load_s, 2),
        "run_s": round(run_s[0], 2),
        "warm_run_s": round(run_s[1], 2),
        "run_cpu_s": round(cpu_s[0], 2),
        "warm_run_cpu_s": round(cpu_s[1], 2),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20)
        if device.type == "cuda"
        else None,
        "measurements": {
            f"{m.concept.meaning}[{m.segment}]": round(m.value, 2)
            for m in findings.measurements
            if m.concept.value in ("118565006", "LAA950")
        },
    }
    if phantom_dir is not None:
        result["truth_lungs_ml"] = round(float(np.load(phantom_dir / "truth_ml.npy")[0]), 2)
    print(json.dumps(result))


def _child(args: list[str]) -> dict[str, object]:
    """Run one measurement in a fresh interpreter; add its peak RSS from wait4."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"args": args, "error": f"exit status {proc.returncode}"}
    result: dict[str, object] = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024)  # Linux: KiB
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["ct-lung", "mr-brain"])
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--phantom-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        _measure(args.measure, args.phantom_dir, args.device, args.threads)
        return 0

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {stamp}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    common = ["--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "ct-lung"):
            started = time.perf_counter()
            _prepare_phantom(Path(tmp))
            print(f"# phantom 300x512x512 generated in {time.perf_counter() - started:.1f} s (not measured)")
            print(json.dumps(_child(["--measure", "ct-lung", "--phantom-dir", tmp, *common])))
        if args.only in (None, "mr-brain"):
            if (_testdata() / MPRAGE).is_dir():
                print(json.dumps(_child(["--measure", "mr-brain", *common])))
            else:
                print(f"# mr-brain skipped: {_testdata() / MPRAGE} is missing (set RADGATE_TESTDATA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
