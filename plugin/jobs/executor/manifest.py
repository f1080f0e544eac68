"""A task's result folder: the manifest a worker writes last (`work`) and the console reads (`web.api`).

Apart from `work`, so that reading results imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "results.json"


def read_manifest(out_dir: Path) -> tuple[tuple[str, str], ...]:
    """(SOP Instance UID, file path) of each result in ``out_dir``, in sending order.

    Raises OSError or ValueError when the manifest is missing or unreadable.
    """
    entries = json.loads((out_dir / MANIFEST).read_text())
    return tuple((uid, str(out_dir / name)) for uid, name in entries)
