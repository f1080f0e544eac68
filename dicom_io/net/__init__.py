"""DICOM networking: the storage SCP transport the node listens with.

The transport receives each C-STORE as bytes, streams them to a file in `incoming_dir` (a complete
DICOM Part 10 file: preamble, file meta with the negotiated transfer syntax, dataset) without
decoding pixels, checks the dataset's structure and identifying UIDs with a cheap walk over the
element headers (within `DatasetLimits`: size, inflated size, nesting), and hands a
`ReceivedInstance` to the handler. The handler makes the file durable (fsync + rename + record)
and returns the DICOM status to answer with. Nothing is acknowledged before the handler returns.

Built on pynetdicom: association negotiation, the DUL state machine and every message other than
a C-STORE-RQ are pynetdicom's; a few narrow subclasses in `_pynetdicom` read whole PDUs into one
buffer, block in `select` instead of polling, and parse, spool and answer C-STORE requests on the
DUL thread without pydicom Datasets (docs/design.md, "Ingest and transport"). With `workers` > 1,
several receiving processes are fed by one acceptor that hands each connection to the least-busy
one; handlers run in the process that received the instance (each receiving process has its copy).

Incoming files are made ahead, in batches, by a thread of each receiving process (`_IncomingFiles`)
with their names already durable, and are read-protected until their dataset is complete: so a
handler that fsyncs a file has it durable under its incoming name at once, and after a power cut
`received_completely` tells complete datasets from partial ones.

This package's names are its public API. Its modules, by concern:

- `interface`: `Peer`, `ReceivedInstance`, the handlers' types, the statuses, `TlsFiles`.
- `inspection`: the element walker (`inspect_dataset`, `inspect_part10`, `DatasetLimits`); the
  receive path, spool recovery and the Orthanc bridge all check a dataset with it before pydicom reads it.
- `wire`: bytes built and checked by hand (file meta header, C-STORE command sets, PDU structure).
- `incoming`: the incoming-file pool and the file a dataset streams into (`_Spool`).
- `connection`: one receiving process's connections and associations (`_Receiver`).
- `scp`: `StorageSCP`, its acceptor and its receiving processes.
- `_pynetdicom`: every use of pynetdicom's private parts, and the check that the installed
  pynetdicom is the release they were written against (pinned exactly in pyproject.toml).

The fsync helpers are `dicom_io.durable`'s: callers import them from there, not through the transport.
"""

from dicom_io.net import _pynetdicom  # noqa: F401  (first: checks the installed pynetdicom's version)
from dicom_io.net.incoming import INCOMING_PREFIX, received_completely
from dicom_io.net.inspection import (
    DEFAULT_LIMITS,
    DatasetLimits,
    InstanceRefused,
    Part10Identity,
    inspect_dataset,
    inspect_part10,
)
from dicom_io.net.interface import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    Peer,
    ReceivedInstance,
    Refusal,
    RefusalReason,
    TlsFiles,
)
from dicom_io.net.scp import StorageSCP
from dicom_io.net.wire import c_store_rsp_command, file_meta_header

__all__ = [
    "DEFAULT_LIMITS",
    "INCOMING_PREFIX",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "DatasetLimits",
    "InstanceRefused",
    "Part10Identity",
    "Peer",
    "ReceivedInstance",
    "Refusal",
    "RefusalReason",
    "StorageSCP",
    "TlsFiles",
    "c_store_rsp_command",
    "file_meta_header",
    "inspect_dataset",
    "inspect_part10",
    "received_completely",
]
