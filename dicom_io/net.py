"""DICOM networking: the storage SCP transport the node listens with.

INTERFACE STUB — being implemented. The node (plugin/receive.py) codes against this seam:
the transport receives each C-STORE as bytes, streams them to a file in `incoming_dir`
(a complete DICOM Part 10 file: preamble, file meta with the negotiated transfer syntax, dataset),
without decoding pixels, reads the identifying UIDs, and hands a `ReceivedInstance` to the
handler. The handler makes the file durable (fsync + rename + record) and returns the DICOM
status to answer with. Nothing is acknowledged before the handler returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an association."""

    ae_title: str
    address: str
    port: int
    association_id: str  # unique per association within this process run


@dataclass(frozen=True)
class ReceivedInstance:
    """One received C-STORE, already on disk in a temporary file the handler now owns."""

    path: Path  # temporary file in incoming_dir; the handler moves or deletes it
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    peer: Peer
    size: int


InstanceHandler = Callable[[ReceivedInstance], int]  # returns a DICOM status, 0x0000 = success
ReleaseHandler = Callable[[Peer], None]  # association released/aborted after storing >=0 instances
PeerFilter = Callable[[Peer], bool]  # False rejects the association
