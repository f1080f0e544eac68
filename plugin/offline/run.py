"""`radgate run`: one pipeline on one folder of DICOM files, offline, without the node.

For trying a pipeline on a case, benchmarking, or re-running by hand. Output in OUT_DIR:

* `findings.json` — pipeline, version, device, grid (shape, LPS affine), segments (number, label,
  codes, colour, voxel count, volume in mL), measurements (coded concept, value, UCUM unit, segment,
  modifier), key slices and notes. Codes are {"value", "scheme", "meaning"}.
* `segments.npz` — one bool array per segment, `segment_<number>`, indexed (slice, row, column)
  like the sorted series (slices ascending along the slice normal), plus `affine`.
* `dicom/` — SEG, SR and SC made by `dicom_io.results.write_results` (unless --no-dicom).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from ai_models import get_pipeline, run_pipeline, select_device
from dicom_io.results import write_results
from dicom_io.types import Code, Findings, Volume
from dicom_io.volume import load_series

if TYPE_CHECKING:
    import torch

FINDINGS_JSON = "findings.json"
SEGMENTS_NPZ = "segments.npz"
DICOM_DIR = "dicom"


def _code(code: Code | None) -> dict[str, str] | None:
    return None if code is None else {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}


def findings_document(findings: Findings, volume: Volume, device: torch.device) -> dict[str, Any]:
    """The findings as plain JSON data (masks summarised; they go to segments.npz)."""
    voxel_ml = volume.voxel_volume_ml
    return {
        "pipeline": findings.pipeline,
        "version": findings.version,
        "device": str(device),
        "series_instance_uid": str(volume.attributes.get("SeriesInstanceUID", "")),
        "shape": list(findings.shape),
        "affine_lps": volume.affine.tolist(),
        "segments": [
            {
                "number": s.number,
                "label": s.label,
                "category": _code(s.category),
                "property_type": _code(s.property_type),
                "anatomic_region": _code(s.anatomic_region),
                "laterality": _code(s.laterality),
                "color_rgb": list(s.color_rgb),
                "voxels": int(s.mask.sum()),
                "volume_ml": float(s.mask.sum()) * voxel_ml,
            }
            for s in findings.segments
        ],
        "measurements": [
            {
                "concept": _code(m.concept),
                "value": m.value,
                "unit": _code(m.unit),
                "segment": m.segment,
                "modifier": _code(m.modifier),
            }
            for m in findings.measurements
        ],
        "key_slices": list(findings.key_slices),
        "notes": list(findings.notes),
    }


def _headers(files: Iterable[Path], wanted: set[str]) -> list[Dataset]:
    """Headers (no pixels) of the files that hold the volume's source instances."""
    headers: list[Dataset] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        meta = ds.get("file_meta") or {}
        uid = str(ds.get("SOPInstanceUID", "")) or str(getattr(meta, "MediaStorageSOPInstanceUID", ""))
        if uid in wanted:
            headers.append(ds)
    return headers


def input_files(input_dir: Path) -> list[Path]:
    """Every file below `input_dir`; `load_series` picks the series a pipeline runs on from them."""
    return sorted(p for p in input_dir.rglob("*") if p.is_file())


def run_offline(
    pipeline_name: str,
    input_dir: Path,
    out_dir: Path,
    *,
    options: dict[str, Any] | None = None,
    device: torch.device | None = None,
    write_dicom: bool = True,
    progress: bool = True,
) -> Findings:
    """Load the main series under `input_dir`, run the pipeline, write the outputs listed above.

    Raises SeriesError (unusable files), PipelineError (unusable series), ResultError (DICOM results).
    """
    device = device or select_device()
    files = input_files(input_dir)
    with tqdm(total=3 if write_dicom else 2, desc=pipeline_name, unit="step", disable=not progress) as bar:
        bar.set_postfix_str(f"loading {len(files)} files")
        volume = load_series(files)
        bar.update()
        bar.set_postfix_str(f"running on {device}")
        findings = run_pipeline(get_pipeline(pipeline_name, **(options or {})), volume, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        document = findings_document(findings, volume, device)
        (out_dir / FINDINGS_JSON).write_text(json.dumps(document, indent=2) + "\n")
        arrays: dict[str, Any] = {f"segment_{s.number}": s.mask for s in findings.segments}
        np.savez_compressed(out_dir / SEGMENTS_NPZ, affine=volume.affine, **arrays)
        bar.update()
        if write_dicom:
            bar.set_postfix_str("writing SEG/SR/SC")
            headers = _headers(files, {ref.sop_instance_uid for ref in volume.sources})
            write_results(findings, volume, headers, out_dir / DICOM_DIR)
            bar.update()
    return findings


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE pairs of --option into pipeline constructor options."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option needs KEY=VALUE, got {pair!r}")
        options[key.strip()] = value
    return options
