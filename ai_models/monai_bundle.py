"""monai-bundle: run a MONAI bundle directory on a Volume and code its labels as segments.

A bundle is the MONAI model zoo's packaging: `configs/metadata.json`, `configs/inference.json`
(or `.yaml`) and `models/model.pt` (a state dict). From the inference config we use:

* `network_def` (required): the network, loaded with `models/model.pt`;
* `preprocessing` (optional): dictionary transforms on key "image"; file loaders and writers
  (LoadImage*, SaveImage*) are dropped because the image arrives in memory as a MetaTensor
  (channel first, RAS affine, as MONAI's own readers give it);
* `inferer` (optional, default: one forward pass over the whole image);
* `postprocessing` (optional): dictionary transforms on key "pred" (e.g. Activationsd, AsDiscreted,
  Invertd back to the input grid); writers are dropped here too.

The prediction must end on the input grid as a label map (or channels, then argmax). A label
table maps each label value to a coded segment: given as a mapping, a JSON file, or
`configs/radgate_labels.json` inside the bundle, e.g.

    {"1": {"label": "Liver", "category": ["123037004", "SCT", "Anatomical Structure"],
           "type": ["10200004", "SCT", "Liver"], "color": [221, 130, 101]}}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from ai_models.base import PipelineError, autocast, basic_reason
from ai_models.labelmap import label_findings
from ai_models.series import bundle_metadata, monai_bundle
from dicom_io.labels import BUNDLE_LABELS, load_label_table
from dicom_io.types import Findings, Volume

DROPPED_TRANSFORMS = ("LoadImage", "SaveImage", "EnsureChannelFirst")


class MonaiBundlePipeline:
    """Any MONAI bundle, configured by its directory and a label table (see the module docstring)."""

    def __init__(
        self,
        bundle_dir: str | Path,
        labels: Mapping[Any, Any] | str | Path | None = None,
        modalities: tuple[str, ...] | None = None,
        min_slices: int = 1,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        config_dir = self.bundle_dir / "configs"
        configs = [config_dir / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
        self.config_file = next((c for c in configs if c.is_file()), None)
        if self.config_file is None:
            raise FileNotFoundError(
                f"{self.bundle_dir} is not a MONAI bundle: no configs/inference.json or .yaml"
            )
        self.weights = self.bundle_dir / "models" / "model.pt"
        if not self.weights.is_file():
            raise FileNotFoundError(f"the bundle {self.bundle_dir} has no weights at models/model.pt")
        metadata = bundle_metadata(self.bundle_dir)
        self.name = f"monai-bundle:{metadata.get('name') or self.bundle_dir.name}"
        self.version = str(metadata.get("version") or "0")
        self.labels = load_label_table(labels if labels is not None else self.bundle_dir / BUNDLE_LABELS)
        self.series = monai_bundle(self.bundle_dir, modalities, min_slices)
        self.modalities = self.series.modalities
        self.min_slices = min_slices

    def accepts(self, volume: Volume) -> str | None:
        if self.modalities:
            return basic_reason(volume, modalities=set(self.modalities), min_slices=self.min_slices)
        return basic_reason(volume, modalities={volume.modality}, min_slices=self.min_slices)

    def _parser(self, device: torch.device) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = device
        for section in ("preprocessing", "postprocessing"):
            if section in parser and isinstance(parser[section], dict) and "transforms" in parser[section]:
                parser[f"{section}#transforms"] = [
                    t
                    for t in parser[section]["transforms"]
                    if not any(d in str(t.get("_target_", "")) for d in DROPPED_TRANSFORMS)
                ]
        return parser

    def run(self, volume: Volume, device: torch.device) -> Findings:
        from dicom_io.volume import to_metatensor  # DICOM-free: Volume -> MONAI MetaTensor (RAS)

        parser = self._parser(device)
        network = parser.get_parsed_content("network_def").to(device)
        state = torch.load(self.weights, map_location=device, weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        network.load_state_dict(state)
        network.eval()
        inferer = parser.get_parsed_content("inferer") if "inferer" in parser else SimpleInferer()

        data: dict[str, Any] = {"image": to_metatensor(volume).to(torch.float32)}
        if "preprocessing" in parser:
            data = parser.get_parsed_content("preprocessing")(data)
        with torch.no_grad(), autocast(device):
            image = data["image"].to(device)
            data["pred"] = inferer(image[None], network)[0].float()
        if "postprocessing" in parser:
            data = parser.get_parsed_content("postprocessing")(data)
        return label_findings(self.name, self.version, volume, _label_map(data["pred"], volume), self.labels)


def _label_map(pred: Any, volume: Volume) -> np.ndarray:
    """The prediction (C, x, y, z) as integer labels on the volume grid (z, y, x)."""
    array = torch.as_tensor(pred).detach().cpu()
    if array.ndim == 4 and array.shape[0] > 1:
        array = array.argmax(dim=0)
    elif array.ndim == 4:
        array = array[0]
    grid = tuple(reversed(volume.shape))
    if tuple(array.shape) != grid:
        raise PipelineError(
            "monai-bundle",
            f"the bundle's output grid {tuple(array.shape)} is not the input grid {grid} (x, y, z); its "
            "postprocessing must bring the prediction back (Invertd)",
        )
    return np.ascontiguousarray(array.round().to(torch.int32).numpy().transpose(2, 1, 0))
