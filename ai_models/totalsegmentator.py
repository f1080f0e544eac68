"""totalsegmentator: TotalSegmentator's task `total` on a CT Volume, its 117 structures coded.

It runs the package's own python API (`totalsegmentator.python_api.totalsegmentator`) on the
volume as an in-memory NIfTI, so resampling (1.5 mm, or 3 mm with `fast`), the five-model merge,
the roi_subset crop and the way back onto the input grid are TotalSegmentator's own; we only turn
the Volume into that NIfTI and the label map it returns back into the Volume's (z, y, x) grid.
Why this way and not the nnunet kind's predictor: docs/design.md, "totalsegmentator".

Nothing is fetched and nothing is sent: the weights must already be under `weights_dir` (checked
when the pipeline is built, `WeightsMissingError` with the command that fetches them), and each
run gets a private TOTALSEG_HOME_DIR whose config.json turns usage statistics off.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from ai_models.base import PipelineError, basic_reason
from ai_models.labelmap import label_findings
from ai_models.nnunet_trainers import predictor_lists_cases_in_process, trainer_class
from ai_models.series import TOTALSEGMENTATOR
from ai_models.series import totalsegmentator as wanted_series
from ai_models.totalseg_catalog import (
    TASK,
    check_roi_subset,
    check_weights,
    download_task,
    label_table,
    weights_root,
)
from dicom_io.types import Findings, Volume
from dicom_io.volume import ras_image

Device = Literal["auto", "cpu", "cuda"]

_OFFLINE_CONFIG = {
    "totalseg_id": "radgate",
    "send_usage_stats": False,
    "statistics_disclaimer_shown": True,
    "prediction_counter": 0,
}
"""TotalSegmentator's config.json as we give it: no usage statistics, no disclaimer on stdout."""
_ENVIRONMENT = (
    "TOTALSEG_HOME_DIR",
    "TOTALSEG_WEIGHTS_PATH",
    "nnUNet_raw",
    "nnUNet_preprocessed",
    "nnUNet_results",
)


class TotalSegmentatorPipeline:
    """TotalSegmentator `total` with the weights a site placed in `weights_dir` (see the module docstring).

    Raises `ai_models.totalseg_catalog.WeightsMissingError` (a FileNotFoundError) when a weight
    folder of the mode is missing, ValueError for an roi_subset name that is not a structure.
    """

    name = "totalsegmentator"

    def __init__(
        self,
        weights_dir: str | Path,
        fast: bool = False,
        roi_subset: Sequence[str] | None = None,
        device: Device = "auto",
        min_slices: int = TOTALSEGMENTATOR.min_slices,
    ) -> None:
        self.weights_dir = Path(weights_dir)
        self.fast = fast
        check_roi_subset(roi_subset or ())
        self.roi_subset = tuple(roi_subset) if roi_subset else None
        self.labels = {
            value: spec
            for value, spec in label_table().items()
            if self.roi_subset is None or spec.label in self.roi_subset
        }
        self.models = check_weights(self.weights_dir, fast, self.roi_subset is not None)
        self.device = device
        self.min_slices = min_slices
        self.version = f"{package_version('TotalSegmentator')}-{download_task(fast)}"
        self.series = wanted_series(min_slices)

    def accepts(self, volume: Volume) -> str | None:
        return basic_reason(volume, modalities={"CT"}, min_slices=self.min_slices)

    def _device(self, device: torch.device) -> str:
        """TotalSegmentator's name for the device this run uses ("cpu", "gpu", "gpu:N")."""
        if self.device == "cpu":
            return "cpu"
        if device.type == "cuda":
            return "gpu" if device.index is None else f"gpu:{device.index}"
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise PipelineError(self.name, "device 'cuda' is configured but this worker sees no GPU")
            return "gpu"
        return "cpu"

    def run(self, volume: Volume, device: torch.device) -> Findings:
        image = to_nifti(volume)
        with offline_totalseg(self.weights_dir), no_fork(), predictor_lists_cases_in_process():
            from totalsegmentator.nnunet import custom_trainers
            from totalsegmentator.python_api import totalsegmentator

            for model in self.models:
                custom_trainers.setdefault(model.trainer, trainer_class(model.trainer))

            output = totalsegmentator(
                image,
                None,
                ml=True,
                task=TASK,
                fast=self.fast,
                roi_subset=list(self.roi_subset) if self.roi_subset else None,
                device=self._device(device),
                quiet=True,
                skip_saving=True,
                nr_thr_resamp=1,
                nr_thr_saving=1,
            )
        return label_findings(
            self.name, self.version, volume, from_nifti(output, volume, self.name), self.labels
        )


@contextlib.contextmanager
def offline_totalseg(weights_dir: Path) -> Iterator[Path]:
    """TotalSegmentator's environment for one run: the site's weights, a private home, no statistics.

    TOTALSEG_WEIGHTS_PATH points at the weights (read only; the site's folder is never written),
    TOTALSEG_HOME_DIR at a temporary folder holding `_OFFLINE_CONFIG` as config.json. The variables
    TotalSegmentator and nnU-Net read are restored afterwards. Yields the temporary home.
    """
    saved = {name: os.environ.get(name) for name in _ENVIRONMENT}
    with tempfile.TemporaryDirectory(prefix="radgate-totalseg-") as home:
        (Path(home) / "config.json").write_text(json.dumps(_OFFLINE_CONFIG))
        os.environ["TOTALSEG_HOME_DIR"] = home
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_root(weights_dir))
        try:
            yield Path(home)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextlib.contextmanager
def no_fork() -> Iterator[None]:
    """Within: multiprocessing's default start method is forkserver; the earlier one is restored after.

    nnU-Net starts its preprocessing's Manager with the default context, which forks this process on
    Linux; a fork of a process that runs other threads (a Ray actor's gRPC threads) can hang the child.
    A forkserver's children are forked from a server process of a single thread instead.
    """
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(previous, force=True)


def to_nifti(volume: Volume) -> Any:
    """The volume as a nibabel NIfTI image (`dicom_io.volume.ras_image`: no copy of the voxels)."""
    import nibabel as nib

    return nib.Nifti1Image(*ras_image(volume))


def from_nifti(image: Any, volume: Volume, pipeline: str) -> npt.NDArray[np.int32]:
    """A label image TotalSegmentator returned for `to_nifti(volume)`, on the volume's (z, y, x) grid.

    Raises PipelineError when it is not on the input's grid (shape or affine differ).
    """
    array = np.asanyarray(image.dataobj)
    voxels, affine = ras_image(volume)
    if array.shape != voxels.shape or not np.allclose(image.affine, affine, atol=1e-3):
        raise PipelineError(pipeline, f"its label map {array.shape} is not on the input grid {voxels.shape}")
    return np.ascontiguousarray(np.asarray(array, dtype=np.int32).transpose(2, 1, 0))
