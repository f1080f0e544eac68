"""nnunet: any nnU-Net v2 trained model folder on a Volume, its labels coded as segments.

nnU-Net's own `nnUNetPredictor` runs the model (`initialize_from_trained_model_folder`,
`predict_single_npy_array`), so its cropping, normalisation, resampling to the plans' spacing,
sliding window, mirroring, fold ensembling and resampling back are exactly those of
`nnUNetv2_predict`. radgate does the orientation: nnU-Net takes an array (z, y, x) as SimpleITK
reads an image file, with the spacing in that order, and never looks at a direction. The volume is
turned, by axis permutation and flips only (no interpolation), into the orientation the model was
trained in (`ORIENTATIONS`), and the label map nnU-Net returns on that grid is turned back, so every
label lands on the very source voxel it was predicted for, for any acquisition plane or slice order.

`NnunetModel` (predictor + orientation) is the part a pipeline built on nnU-Net reuses;
`NnunetPipeline` adds the label table and the checks. The model folder and label table are
checked without torch by `ai_models.nnunet_folder` (also at node start, in `plugin.config`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from ai_models.base import PipelineError, basic_reason, patient_axes
from ai_models.labelmap import label_findings
from ai_models.nnunet_folder import (
    DEFAULT_CHECKPOINT,
    LABELS_FILE,
    Fold,
    ModelFolder,
    check_label_table,
    read_model_folder,
)
from ai_models.nnunet_trainers import predictor_finds_trainers
from ai_models.series import nnunet as nnunet_series
from dicom_io.labels import load_label_table
from dicom_io.types import Findings, Volume

Orientation = Literal["RAS", "LPS", "native"]
ORIENTATIONS: dict[str, str] = {
    "RAS": "array axes run to Superior, Anterior, Right: a NIfTI in nibabel's closest canonical (RAS) "
    "orientation as SimpleITK or nnU-Net's NibabelIOWithReorient read it (TotalSegmentator does this)",
    "LPS": "array axes run to Superior, Posterior, Left: an axial DICOM series (feet to head) as "
    "SimpleITK reads it, or an image converted from one by SimpleITK/ITK",
    "native": "the series' own axes: slices ascending along the normal, rows, columns (no turning)",
}
"""What each orientation option feeds nnU-Net (the array (z, y, x) it gets, in patient terms)."""
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Reorientation:
    """Volume grid → nnU-Net's array: transpose by `axes`, then flip the array axes in `flips`."""

    axes: tuple[int, int, int]
    flips: tuple[int, ...]

    @classmethod
    def of(cls, volume: Volume, orientation: Orientation) -> Reorientation:
        """How to turn `volume` into `orientation` (ValueError: not one of `ORIENTATIONS`)."""
        if orientation == "native":
            return cls((0, 1, 2), ())
        if orientation not in ("RAS", "LPS"):
            raise ValueError(f"orientation {orientation!r}: one of {', '.join(ORIENTATIONS)}")
        axes, towards = patient_axes(volume.affine)  # per patient axis L, P, S: voxel axis, points to R/A/I
        order = (axes[2], axes[1], axes[0])  # array axis 0 along S, 1 along P/A, 2 along L/R
        wanted = (False, orientation == "RAS", orientation == "RAS")  # towards I, A, R (vs S, P, L)
        flips = tuple(k for k, p in enumerate((2, 1, 0)) if towards[p] != wanted[k])
        return cls(order, flips)

    def forward(self, voxels: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.flip(np.transpose(voxels, self.axes), self.flips)

    def backward(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.ascontiguousarray(np.transpose(np.flip(array, self.flips), np.argsort(self.axes)))

    def spacing(self, volume: Volume) -> list[float]:
        return [volume.spacing[axis] for axis in self.axes]


class NnunetModel:
    """A trained model folder ready to predict label maps on volumes, on one device at a time.

    The weights load on the first `predict` for a device (in the worker, not where the pipeline is
    built); the predictor stays for later volumes.
    """

    def __init__(
        self,
        folder: ModelFolder,
        *,
        orientation: Orientation = "RAS",
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
    ) -> None:
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation {orientation!r}: one of {', '.join(ORIENTATIONS)}")
        if not 0.0 < tile_step_size <= 1.0:
            raise ValueError(f"tile_step_size {tile_step_size}: a fraction of the patch in (0, 1]")
        self.folder = folder
        self.orientation = orientation
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self._predictor: Any = None
        self._device: torch.device | None = None

    def _predictor_on(self, device: torch.device) -> Any:
        if self._predictor is not None and self._device == device:
            return self._predictor
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with contextlib.redirect_stdout(io.StringIO()):  # it prints that CPU work stays on the CPU
            predictor = nnUNetPredictor(
                tile_step_size=self.tile_step_size,
                use_gaussian=True,
                use_mirroring=self.use_mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            with predictor_finds_trainers():
                predictor.initialize_from_trained_model_folder(
                    str(self.folder.path), list(self.folder.folds), self.folder.checkpoint
                )
        wanted = predictor.plans_manager.get_configuration(self.folder.configuration).configuration
        if predictor.configuration_manager.configuration != wanted:
            raise ValueError(
                f"{self.folder.path}: the weights were not trained with configuration "
                f"{self.folder.configuration!r} (their checkpoint names another)"
            )
        self._predictor, self._device = predictor, device
        return predictor

    def predict(self, volume: Volume, device: torch.device) -> npt.NDArray[np.int32]:
        """The label map on the volume grid (z, y, x), 0 background."""
        turn = Reorientation.of(volume, self.orientation)
        image = np.ascontiguousarray(turn.forward(volume.voxels), dtype=np.float32)[None]
        predictor = self._predictor_on(device)
        labels = predictor.predict_single_npy_array(image, {"spacing": turn.spacing(volume)})
        if tuple(labels.shape) != image.shape[1:]:
            raise PipelineError(
                f"nnunet:{self.folder.dataset_name}",
                f"nnU-Net returned a label map of shape {labels.shape} for an input of {image.shape[1:]}",
            )
        return turn.backward(np.asarray(labels, dtype=np.int32))


class NnunetPipeline:
    """Any nnU-Net v2 trained model folder with a label table (see the module docstring).

    Raises ModelFolderError (a ValueError) for an unusable folder and ValueError for a label table
    that does not parse or names values the model does not output, when built.
    """

    def __init__(
        self,
        model_dir: str | Path,
        labels: Mapping[Any, Any] | str | Path | None = None,
        configuration: str | None = None,
        folds: Sequence[Fold] | None = None,
        checkpoint: str = DEFAULT_CHECKPOINT,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        orientation: Orientation = "RAS",
        device: Device = "auto",
        modalities: tuple[str, ...] | None = None,
        min_slices: int = 1,
    ) -> None:
        folder = read_model_folder(model_dir, configuration, folds, checkpoint)
        self.labels = load_label_table(labels if labels is not None else folder.path / LABELS_FILE)
        check_label_table(self.labels, folder)
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {device!r}: auto, cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"nnunet {folder.dataset_name}: device is 'cuda' but torch sees no CUDA device")
        self.model = NnunetModel(
            folder, orientation=orientation, tile_step_size=tile_step_size, use_mirroring=use_mirroring
        )
        self.device = device
        self.name = f"nnunet:{folder.dataset_name}"
        self.version = f"{folder.release}+{folder.digest()}"
        self.series = nnunet_series(folder.path, modalities, min_slices)
        self.modalities = self.series.modalities
        self.min_slices = min_slices

    def accepts(self, volume: Volume) -> str | None:
        modalities = set(self.modalities) if self.modalities else {volume.modality}
        return basic_reason(volume, modalities=modalities, min_slices=self.min_slices)

    def run(self, volume: Volume, device: torch.device) -> Findings:
        if self.device == "cpu":
            device = torch.device("cpu")
        elif self.device == "cuda" and device.type != "cuda":
            device = torch.device("cuda")
        labels = self.model.predict(volume, device)
        return label_findings(self.name, self.version, volume, labels, self.labels)
