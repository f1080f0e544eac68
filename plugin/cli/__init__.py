"""The `radgate` command: one module per command group; all of the CLI's printing lives here.

* `plugin.cli.main`: the parser and `main` (the console script and ``python -m plugin.cli``).
* `plugin.cli.studies`, `plugin.cli.jobs`, `plugin.cli.deliveries`, `plugin.cli.rules`,
  `plugin.cli.run`, `plugin.cli.validate`, `plugin.cli.users`, `plugin.cli.audit`,
  `plugin.cli.fetch`: one command group each (`radgate serve`, `worker` and `web` run the node:
  `plugin.node`, `plugin.web.app`).
"""

from plugin.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
