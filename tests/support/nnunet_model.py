"""A tiny nnU-Net v2 trained model folder, built on the fly with weights set by hand (nothing downloaded).

`write_band_model(root, thresholds)` writes the layout `nnUNetv2_predict -d ... -tr ... -c ...` reads:

    root/dataset.json   channel "CT", labels background + one per band
    root/plans.json     one configuration (3d_fullres or 2d), a 2-stage PlainConvUNet, no norm, ReLU
    root/fold_0/checkpoint_final.pth  (and fold_N for more folds)

The network computes a known function of intensity: label k where thresholds[k-1] <= HU < thresholds[k]
(label 0 below the first). nnU-Net's CT normalisation is (clip(HU, -1000, 2000) - 0) / 500, set
in plans.json. The first encoder convolution passes that value through (centre tap 1, bias B so it
stays positive through the ReLU), the decoder's last stage takes it from the skip connection
(everything coming up from the deeper stage weighted 0), and the 1x1x1 segmentation layer makes
logit_k = k * x - sum(t_1..t_k) (t the thresholds normalised): logit_k - logit_(k-1) = x - t_k, so
the argmax is the number of thresholds below x. Voxel by voxel, so nnU-Net's sliding windows,
Gaussian weighting and mirroring leave it unchanged; on a grid at the plans' spacing nothing is
resampled and the expected label map is exact. Keep test intensities well away (>= 100 HU) from the
thresholds: the summed logits are float16.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

NORMALISATION = {"mean": 0.0, "std": 500.0, "low": -1000.0, "high": 2000.0}
"""nnU-Net CTNormalization: (clip(HU, low, high) - mean) / std."""
_PASS_BIAS = 3.0  # > -low / std, so the passed-through value is never cut by the ReLU

FEATURES = (4, 8)

CODES: list[dict[str, Any]] = [
    {
        "label": "Band one",
        "category": ["123037004", "SCT", "Anatomical Structure"],
        "type": ["10200004", "SCT", "Liver"],
        "color": [221, 130, 101],
    },
    {
        "label": "Band two",
        "category": ["123037004", "SCT", "Anatomical Structure"],
        "type": ["64033007", "SCT", "Kidney"],
        "color": [185, 102, 83],
    },
    {
        "label": "Band three",
        "category": ["123037004", "SCT", "Anatomical Structure"],
        "type": ["272673000", "SCT", "Bone structure"],
        "color": [241, 214, 145],
    },
    {
        "label": "Band four",
        "category": ["123037004", "SCT", "Anatomical Structure"],
        "type": ["78961009", "SCT", "Spleen"],
        "color": [157, 108, 162],
    },
]


def band_labels(thresholds: Sequence[float]) -> dict[str, dict[str, Any]]:
    """A radgate label table (JSON form) for the model's labels 1..len(thresholds)."""
    if not 1 <= len(thresholds) <= len(CODES):
        raise ValueError(f"1 to {len(CODES)} thresholds, got {len(thresholds)}")
    return {str(k): CODES[k - 1] for k in range(1, len(thresholds) + 1)}


def expected_labels(voxels: npt.NDArray[Any], thresholds: Sequence[float]) -> npt.NDArray[np.int64]:
    """The label map the model predicts for these intensities (HU): the number of thresholds below."""
    clipped = np.clip(voxels.astype(np.float64), NORMALISATION["low"], NORMALISATION["high"])
    return np.searchsorted(np.asarray(thresholds, dtype=np.float64), clipped, side="right").astype(np.int64)


def band_phantom(
    shape: tuple[int, int, int], thresholds: Sequence[float] = (-400.0, 200.0, 800.0)
) -> npt.NDArray[np.int16]:
    """Voxels (z, y, x) in HU with one block per band, none symmetric under any flip or axis swap.

    Air (band 0) around a box of band 1 in one corner, a bar of band 2 along the columns off every
    centre line, and a small cube of the highest band near the opposite corner; each value sits
    midway between thresholds.
    """
    edges = [-1000.0, *thresholds, 2000.0]
    value = [round((edges[k] + edges[k + 1]) / 2) for k in range(len(edges) - 1)]
    z, y, x = shape
    voxels = np.full(shape, value[0], dtype=np.int16)
    voxels[: z // 2, : y // 2, : (2 * x) // 3] = value[1]
    if len(value) > 2:
        voxels[z // 4 : (3 * z) // 4, (2 * y) // 3 : (2 * y) // 3 + max(2, y // 6), x // 5 :] = value[2]
    voxels[-max(2, z // 4) :, -3:, -2:] = value[-1]
    return voxels


def dataset_json(labels: int, channel: str = "CT") -> dict[str, Any]:
    names = {"background": 0} | {f"band_{k}": k for k in range(1, labels + 1)}
    return {
        "channel_names": {"0": channel},
        "labels": names,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "name": "RadgateBands",
        "release": "1.0",
    }


def plans_json(configuration: str, spacing: float, patch: int) -> dict[str, Any]:
    """plans.json with one configuration: 3d_fullres (3-D patch) or 2d (2-D patch, per slice)."""
    dims = 2 if configuration == "2d" else 3
    conv = f"torch.nn.modules.conv.Conv{dims}d"
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": len(FEATURES),
            "features_per_stage": list(FEATURES),
            "conv_op": conv,
            "kernel_sizes": [[3] * dims for _ in FEATURES],
            "strides": [[1] * dims] + [[2] * dims for _ in FEATURES[1:]],
            "n_conv_per_stage": [1] * len(FEATURES),
            "n_conv_per_stage_decoder": [1] * (len(FEATURES) - 1),
            "conv_bias": True,
            "norm_op": None,
            "norm_op_kwargs": None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.ReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    seg_kwargs = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    prob_kwargs = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [patch] * dims,
        "median_image_size_in_voxels": [patch] * 3,
        "spacing": [spacing] * dims if dims == 3 else [spacing, spacing],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": data_kwargs,
        "resampling_fn_seg_kwargs": seg_kwargs,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": prob_kwargs,
        "architecture": arch,
        "batch_dice": False,
    }
    low, high = NORMALISATION["low"], NORMALISATION["high"]
    intensity = {
        "max": high,
        "mean": NORMALISATION["mean"],
        "median": NORMALISATION["mean"],
        "min": low,
        "percentile_00_5": low,
        "percentile_99_5": high,
        "std": NORMALISATION["std"],
    }
    return {
        "dataset_name": "Dataset999_RadgateBands",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [patch] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity},
    }


def band_weights(thresholds: Sequence[float], configuration: str = "3d_fullres") -> dict[str, Any]:
    """The network's state dict (torch tensors) that computes the bands (see the module docstring)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    dims = 2 if configuration == "2d" else 3
    arch = plans_json(configuration, 1.0, 8)["configurations"][configuration]["architecture"]
    network = get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        1,
        len(thresholds) + 1,
        allow_init=False,
        deep_supervision=False,
    )
    first = network.encoder.stages[0][0].convs[0].conv  # modules, not state-dict keys: those alias
    last = network.decoder.stages[0].convs[0].conv
    seg = network.decoder.seg_layers[0]
    normalised = (np.asarray(thresholds, dtype=np.float64) - NORMALISATION["mean"]) / NORMALISATION["std"]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        first.weight[(0, 0) + (1,) * dims] = 1.0  # output channel 0 <- input channel 0, the kernel's centre
        first.bias[0] = _PASS_BIAS
        # the decoder's stage sees cat(upsampled (FEATURES[0] channels), skip): take the skip's channel 0
        last.weight[(0, FEATURES[0]) + (1,) * dims] = 1.0
        for k in range(len(thresholds) + 1):  # logit_k = k * (f - B) - sum(t_1..t_k), f = x + B
            seg.weight[(k, 0) + (0,) * dims] = float(k)
            seg.bias[k] = -k * _PASS_BIAS - float(normalised[:k].sum())
    return {key: value.clone() for key, value in network.state_dict().items()}


def write_band_model(
    root: Path,
    thresholds: Sequence[float] = (-400.0, 200.0, 800.0),
    *,
    configuration: str = "3d_fullres",
    spacing: float = 2.0,
    patch: int = 16,
    folds: Sequence[int] = (0,),
    checkpoint: str = "checkpoint_final.pth",
    labels_file: bool = True,
    trainer: str = "nnUNetTrainer",
) -> Path:
    """Write the model folder (see the module docstring); `labels_file` adds radgate_labels.json.

    thresholds: ascending HU values, one per foreground label; trainer: the class the checkpoint
    names; spacing (mm, isotropic) and patch (voxels per axis) are the configuration's; a volume at
    that spacing is not resampled.
    """
    import torch

    if list(thresholds) != sorted(thresholds):
        raise ValueError(f"thresholds must ascend, got {thresholds}")
    root.mkdir(parents=True, exist_ok=True)
    dataset = dataset_json(len(thresholds))
    plans = plans_json(configuration, spacing, patch)
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (root / "plans.json").write_text(json.dumps(plans, indent=2))
    if labels_file:
        (root / "radgate_labels.json").write_text(json.dumps(band_labels(thresholds), indent=2))
    weights = band_weights(thresholds, configuration)
    for fold in folds:
        (root / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": weights,
                "trainer_name": trainer,
                "init_args": {
                    "plans": plans,
                    "configuration": configuration,
                    "fold": fold,
                    "dataset_json": dataset,
                },
                "inference_allowed_mirroring_axes": (0, 1) if configuration == "2d" else (0, 1, 2),
                "current_epoch": 1,
            },
            root / f"fold_{fold}" / checkpoint,
        )
    return root
