"""Helpers the pipeline tests share: volumes straight from phantoms, re-oriented copies, pictures."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicom_io.testing.synthetic import SyntheticSeries
from dicom_io.types import SourceRef, Volume

SOP_CT = "1.2.840.10008.5.1.4.1.1.2"


def phantom_volume(series: SyntheticSeries, **attributes: Any) -> Volume:
    """A Volume built from the phantom's voxels and affine (no DICOM round trip)."""
    modality = str(series.datasets[0].Modality)
    refs = tuple(SourceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in series.datasets)
    attrs = {"Modality": modality, "BodyPartExamined": str(series.datasets[0].BodyPartExamined)}
    attrs.update(attributes)
    return Volume(series.voxels, series.affine, refs, attrs)


@contextlib.contextmanager
def heap_kept() -> Iterator[None]:
    """Within the block, glibc's malloc keeps freed memory for reuse instead of handing each large
    block back to the kernel: a CPU forward pass of a 3-D network allocates and frees hundreds of MB
    per layer, and the fresh pages the kernel zeroes each time cost about a third of HD-BET's CPU time.
    Settings restored and the heap trimmed afterwards; a no-op where the C library is not glibc."""
    libc = ctypes.CDLL(None)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)  # glibc's defaults
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Within the block, torch computes on one thread; its setting is restored afterwards. (The test
    command runs more pytest workers than there are cores, where more threads only wait for one.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _digest(value: Any) -> Any:
    """A key for an argument: arrays by dtype, shape and a hash of their bytes (a bool array's packed
    to bits), the rest as they are."""
    if isinstance(value, np.ndarray):
        data = np.packbits(value) if value.dtype == np.bool_ else np.ascontiguousarray(value)
        digest = hashlib.sha1(memoryview(data).cast("B"), usedforsecurity=False).digest()
        return ("array", str(value.dtype), value.shape, digest)
    if isinstance(value, Volume):
        return ("volume", _digest(value.voxels), _digest(value.affine))
    if isinstance(value, (tuple, list)):
        return tuple(_digest(v) for v in value)
    return value


def remembering(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, remembering its results: a call with arguments equal to an earlier call's (arrays
    and volumes compared by content) gets that result back. Only for pure functions (a pipeline's
    run, a score): it changes no result, it spares computing the same one twice."""
    seen: dict[Any, Any] = {}

    def call(*args: Any) -> Any:
        key = tuple(_digest(a) for a in args)
        if key not in seen:
            seen[key] = function(*args)
        return seen[key]

    return call


def remember_runs(patch: Any, pipeline_class: type, *options: str) -> None:
    """Patch `pipeline_class.run` (with `patch`, a pytest.MonkeyPatch) so that a run on a volume equal
    to an earlier run's, by a pipeline whose `options` attributes are equal too, gets that run's
    findings back: the same pure computation, made once."""
    run = pipeline_class.run
    runs: dict[Any, Any] = {}

    def remembered(pipeline: Any, volume: Volume, device: Any) -> Any:
        key = (tuple(getattr(pipeline, o) for o in options), _digest(volume), str(device))
        if key not in runs:
            runs[key] = run(pipeline, volume, device)
        return runs[key]

    patch.setattr(pipeline_class, "run", remembered)


def flipped(volume: Volume, axis: int) -> Volume:
    """The same patient with voxel axis `axis` (0 slice, 1 row, 2 column) stored backwards.

    The affine is changed to match, so every voxel keeps its place in the patient: a pipeline that
    reads sides from the affine gives the same answer, one that reads the array index does not.
    """
    n = volume.shape[axis]
    column = 2 - axis  # affine column of that voxel axis
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, column] * (n - 1)
    affine[:3, column] *= -1
    sources = volume.sources[::-1] if axis == 0 else volume.sources
    return Volume(
        np.ascontiguousarray(np.flip(volume.voxels, axis)), affine, sources, dict(volume.attributes)
    )


def flip_mask(mask: npt.NDArray[np.bool_], axis: int) -> npt.NDArray[np.bool_]:
    return np.ascontiguousarray(np.flip(mask, axis))


def overlay_png(
    image: npt.NDArray[Any], masks: list[npt.NDArray[np.bool_]], path: Path, window: tuple[float, float]
) -> None:
    """One 2-D image with coloured mask outlines filled at 40 % (for looking, not for asserting)."""
    from PIL import Image

    lo, hi = window
    grey = np.clip((image.astype(np.float32) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    colours = [(255, 60, 60), (60, 160, 255), (255, 220, 0), (0, 255, 120)]
    for mask, colour in zip(masks, colours, strict=False):
        rgb[mask] = 0.6 * rgb[mask] + 0.4 * np.array(colour, dtype=np.float32)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


BONE = {
    "1": {
        "label": "Bone",
        "category": ["123037004", "SCT", "Anatomical Structure"],
        "type": ["272673000", "SCT", "Bone structure"],
        "color": [241, 214, 145],
    }
}


def write_threshold_bundle(root: Path, *, resample: bool, labels: bool = True) -> Path:
    """A MONAI bundle (model zoo layout) whose 1x1x1 convolution labels HU > 200 as 1 ("Bone").

    Channels background = 200 - HU and bone = HU - 200, so the argmax is exactly the threshold.
    """
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    metadata = {
        "name": "bone_threshold",
        "version": "0.1.0",
        "network_data_format": {"inputs": {"image": {"modality": "CT", "num_channels": 1}}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    preprocessing: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    postprocessing = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    if resample:  # change the grid on the way in, so the way back (Invertd) is tested too
        preprocessing += [
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        ]
        postprocessing = [
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
            },
            *postprocessing,
        ]
    inference = {
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 2},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    import torch

    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1))
        assert conv.bias is not None
        conv.bias.copy_(torch.tensor([200.0, -200.0]))
    torch.save(conv.state_dict(), root / "models" / "model.pt")
    if labels:
        (root / "configs" / "radgate_labels.json").write_text(json.dumps(BONE))
    return root
