"""The script Orthanc's Python plugin runs: find radgate and its virtual environment, then hand over.

Orthanc embeds the system's Python (Debian: 3.11), not the one radgate's virtual environment was
made with, so this puts the repository (this file's folder's parent) and the environment's
site-packages first on ``sys.path``; compiled wheels work when both are the same minor version
(same ABI tag, e.g. cp311), which is checked here. The environment is ``$RADGATE_VENV``, else the
``Radgate.Venv`` key of Orthanc's configuration, else ``.venv`` in the repository.
All the plugin's work is in `plugin.orthanc.entry`.
"""

import json
import os
import site
import sys
from pathlib import Path

import orthanc

REPO = Path(__file__).resolve().parents[1]


def _site_packages() -> Path:
    section = json.loads(orthanc.GetConfiguration()).get("Radgate") or {}
    venv = Path(os.environ.get("RADGATE_VENV") or section.get("Venv") or REPO / ".venv")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def _add_paths() -> None:
    """Repository and site-packages (with its .pth files) before the system's own packages."""
    packages = _site_packages()
    if not packages.is_dir():
        orthanc.LogWarning(f"radgate: {packages} not found; using the system's Python packages")
    before = list(sys.path)
    site.addsitedir(str(packages))
    added = [p for p in sys.path if p not in before]
    sys.path[:] = [str(REPO), *added, *(p for p in before if p != str(REPO))]


try:
    _add_paths()
    from plugin.orthanc.entry import register

    register(orthanc)
except Exception as err:  # Orthanc keeps running without radgate
    orthanc.LogError(f"radgate: plugin not loaded: {type(err).__name__}: {err}")
