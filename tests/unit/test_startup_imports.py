"""What a starting process imports: only what it runs (docs/design.md, "Start-up cost").

Every process `radgate serve` spawns (a receiving process, a worker) re-imports the console script's
module, `plugin.cli.main`, before it runs its target; and the node's main process imports
`plugin.node` before it listens. One fresh interpreter checks both, the way `radgate serve` imports
them: the CLI first, then the node.
"""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import plugin.cli.main
cli = sorted(sys.modules)
import plugin.node
print(json.dumps({"cli": cli, "node": sorted(sys.modules)}))
"""

# A command's own modules, and what only some command needs; none of them is imported by the CLI
# itself, so a spawned child pays only for its target.
NOT_FOR_THE_CLI = (
    "plugin.config",
    "plugin.store",
    "plugin.node",
    "sqlalchemy",
    "pydantic",
    "pydicom",
    "yaml",
)
# Building results (highdicom, scipy), de-identifying (dicomanonymizer) and running models (torch,
# monai) happen in workers or when a delivery needs them, never at a node's start.
NOT_FOR_THE_NODE = ("highdicom", "scipy", "dicomanonymizer", "torch", "monai", "plugin.dispatch.deidentify")


def _loaded(modules: list[str], roots: tuple[str, ...]) -> list[str]:
    return sorted({m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)})


def test_the_cli_and_the_node_import_only_what_serving_needs() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=120
    )
    loaded = json.loads(out.stdout)
    assert _loaded(loaded["cli"], NOT_FOR_THE_CLI) == []
    assert "plugin.node" in loaded["node"]  # the probe did import the node
    assert _loaded(loaded["node"], NOT_FOR_THE_NODE) == []
