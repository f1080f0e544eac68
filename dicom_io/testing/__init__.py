"""Test, benchmark and demo support: never used on the node's receive/process path.

What the tests, `bench/` and `radgate demo` need to drive radgate from outside, kept apart from the
product code so a reader of `dicom_io/` and `plugin/` sees only what a node runs:

- `synthetic`: CT and MR phantom series with known ground truth (`ct_chest_phantom`, `mr_head_phantom`).
- `tools`: the real DICOM tools (DCMTK, dicom3tools, dcm2niix) run as independent peers.
- `validate`: the real validators (dciodvfy, pixelmed, dsrdump, OHIF's loaders) as functions.
- `structure`: a viewer's-eye summary of any SEG or TID 1500 SR, to compare ours with dcmqi's.
- `orthanc_server`: a real Orthanc process on free loopback ports (tests and `radgate demo`).

The node itself (`plugin/` outside `plugin/demo/local.py`, `dicom_io/` outside this package) imports none
of these.
"""
