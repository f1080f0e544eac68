"""Fake TotalSegmentator weights in its own folder layout, from the tiny band model (`nnunet_model`).

`place_weights(weights_dir, fast=...)` puts a model folder for every model TotalSegmentator runs in
that mode where `TOTALSEG_HOME_DIR=weights_dir totalseg_download_weights` would, each with the
trainer its real checkpoint names. With `real=False` the folders hold empty checkpoint files only
(enough for the start checks, which look at files and nothing else).

The band model predicts label k of task total (1..117) for HU in [BANDS[k-1], BANDS[k]); `band(k)`
is an intensity in the middle of band k. Its plans' spacing is the mode's resampling (3 mm fast),
so on a 3 mm grid TotalSegmentator and nnU-Net resample nothing and the label map is exact.
"""

from __future__ import annotations

from pathlib import Path

from ai_models.totalseg_catalog import CHECKPOINT, FOLD, models
from support.nnunet_model import write_band_model

LABELS = 117
BANDS = tuple(-1000.0 + 25.0 * k for k in range(1, LABELS + 1))
SPACING_MM = {297: 3.0, 298: 6.0}  # the fast and the crop model; the five 1.5 mm parts otherwise


def band(label: int) -> int:
    """An intensity (HU) the band model gives `label`, 12 HU from either edge of its band."""
    return int(-1000 + 25 * label + 12)


def place_weights(
    weights_dir: Path, *, fast: bool = True, roi_subset: bool = False, real: bool = True
) -> Path:
    """Put the mode's model folders under `weights_dir` (TOTALSEG_HOME_DIR layout); returns it."""
    import torch

    for model in models(fast, roi_subset):
        folder = model.folder(weights_dir)
        if not real:
            (folder / f"fold_{FOLD}").mkdir(parents=True, exist_ok=True)
            (folder / f"fold_{FOLD}" / CHECKPOINT).touch()
            continue
        write_band_model(
            folder, BANDS, spacing=SPACING_MM.get(model.task_id, 1.5), patch=16, labels_file=False
        )
        checkpoint = folder / f"fold_{FOLD}" / CHECKPOINT
        saved = torch.load(checkpoint, weights_only=False)
        saved["trainer_name"] = model.trainer  # as TotalSegmentator's real checkpoints name it
        torch.save(saved, checkpoint)
    return weights_dir
