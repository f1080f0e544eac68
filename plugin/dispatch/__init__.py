"""Dispatch: results out to their destinations.

* `plugin.dispatch.outbox`: the deliveries table as an outbox, with retries and backoff.
* `plugin.dispatch.senders`: one sender per destination kind (DICOM C-STORE, DICOMweb STOW-RS, Orthanc).
"""
