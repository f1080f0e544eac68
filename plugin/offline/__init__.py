"""Runs without the node.

* `plugin.offline.run`: `radgate run`, one pipeline on one series folder.
* `plugin.offline.acceptance`: `radgate validate`, scoring against reference segmentations.
"""
