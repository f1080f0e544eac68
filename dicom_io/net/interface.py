"""What the node codes against: the peer, a received instance, the handlers' types, the DICOM
statuses the transport answers with, the transfer syntaxes it accepts and TLS material."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an association."""

    ae_title: str
    address: str
    port: int
    association_id: str  # unique per association within this process run
    released: bool = False  # to the ReleaseHandler: ended by an A-RELEASE (False: aborted, cut off)


@dataclass(frozen=True)
class ReceivedInstance:
    """One received C-STORE, already on disk in a temporary file the handler now owns."""

    path: Path  # in incoming_dir, its name durable; the handler links or deletes it (module docstring)
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    peer: Peer
    size: int
    durable_name: bool = False  # the file's name survives a power cut once the file is fsync'd


class RefusalReason:
    """Why the transport refused an instance or an association: the short codes `Refusal` carries."""

    DATASET_TOO_LARGE = "dataset_too_large"  # dicom.max_dataset_bytes
    INFLATED_TOO_LARGE = "inflated_too_large"  # dicom.max_inflated_bytes (a deflate bomb)
    SEQUENCE_TOO_DEEP = "sequence_too_deep"  # dicom.max_sequence_depth
    MALFORMED = "malformed"  # truncated or mis-encoded bytes, missing or malformed identifying UIDs
    DATASET_MISMATCH = "dataset_mismatch"  # 0xA900: UIDs or Pixel Data that do not fit the request
    WRITE_FAILED = "write_failed"  # the incoming file could not be written or read back
    MAX_ASSOCIATIONS = "max_associations"
    MAX_ASSOCIATIONS_PER_PEER = "max_associations_per_peer"
    CALLED_AE_TITLE = "called_ae_title"  # dicom.require_called_ae_title
    PEER_NOT_ALLOWED = "peer_not_allowed"  # the peer filter said no


@dataclass(frozen=True)
class Refusal:
    """One refusal by the transport, for the `RefusalHandler` (counting; the transport logs it)."""

    reason: str  # a `RefusalReason` code
    association: bool  # True: an A-ASSOCIATE-RQ was rejected; False: a C-STORE got a failure status
    status: int | None = None  # the C-STORE's failure status (None for an association)


InstanceHandler = Callable[[ReceivedInstance], int]  # returns a DICOM status, 0x0000 = success
ReleaseHandler = Callable[[Peer], None]  # association ended (`Peer.released`) after storing >=0 instances
PeerFilter = Callable[[Peer], bool]  # False rejects the association
RefusalHandler = Callable[[Refusal], None]  # told of each refusal, where it happened; must be quick

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # dataset does not match SOP class
STATUS_CANNOT_UNDERSTAND = 0xC000

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
"""Transfer syntaxes accepted for every storage SOP class (uncompressed first: preferred)."""


@dataclass(frozen=True)
class TlsFiles:
    """TLS material as file paths; unlike an `ssl.SSLContext` it can be handed to worker processes."""

    cert: Path
    key: Path
    ca: Path | None = None  # when set, client certificates signed by it are required

    def context(self) -> ssl.SSLContext:
        """Build the server-side context (TLS 1.2+)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx
