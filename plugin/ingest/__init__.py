"""Ingest: accept an instance, make it durable in the spool, record it; recover the spool at start.

* `plugin.ingest.receive`: the C-STORE handler (peer filter, limits, fsync, link, record).
* `plugin.ingest.spool`: the spool on disk and its recovery.
* `plugin.ingest.datadir`: the data dir's lock and file modes.
"""
