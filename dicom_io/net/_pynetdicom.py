"""DICOM networking: the storage SCP transport the node listens with.

The transport receives each C-STORE as bytes, streams them to a file in `incoming_dir` (a complete
DICOM Part 10 file: preamble, file meta with the negotiated transfer syntax, dataset) without
decoding pixels, checks the dataset's structure and identifying UIDs with a cheap walk over the
element headers (within `DatasetLimits`: size, inflated size, nesting), and hands a
`ReceivedInstance` to the handler. The handler makes the file durable (fsync + rename + record)
and returns the DICOM status to answer with. Nothing is acknowledged before the handler returns.

Built on pynetdicom: association negotiation, the DUL state machine and every message other than
a C-STORE-RQ are pynetdicom's. Speed comes from a few narrow subclasses (`_FastDUL`, `_FastSocket`,
`_SpoolingDIMSE`, `_Association`): whole-PDU reads into one buffer; a DUL loop that blocks in
`select` instead of pynetdicom's 1 ms polling sleeps; C-STORE requests parsed, spooled and answered
on the DUL thread without pydicom Datasets (fixed layouts encoded by hand, checked byte-equal to
pydicom's in the tests); no per-PDU debug logging handlers; and optionally several receiving
processes (`workers`) fed by one acceptor that hands each connection to the least-busy one.
Handlers run in the process that received the instance (each receiving process has its copy).

Incoming files are made ahead, in batches, by a thread of each receiving process (`_IncomingFiles`)
with their names already durable, and are read-protected until their dataset is complete: so a
handler that fsyncs a file has it durable under its incoming name at once, and after a power cut
`received_completely` tells complete datasets from partial ones.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import gc
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import queue
import re
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from io import BytesIO, FileIO
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import IO, Any, Protocol, cast

from pydicom import config as pydicom_config
from pydicom.datadict import DicomDictionary
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
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation, AssociationSocket

LOGGER = logging.getLogger(__name__)

# --- the interface the node codes against -------------------------------------------------------


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


InstanceHandler = Callable[[ReceivedInstance], int]  # returns a DICOM status, 0x0000 = success
ReleaseHandler = Callable[[Peer], None]  # association ended (`Peer.released`) after storing >=0 instances
PeerFilter = Callable[[Peer], bool]  # False rejects the association

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


# --- checking a received dataset without decoding it --------------------------------------------


class InstanceRefused(Exception):
    """A received dataset the SCP answers with a failure status instead of handing it on."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class DatasetIdentity:
    """The attributes the transport reads from each dataset."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_STUDY_UID, _SERIES_UID, _SOP_INSTANCE_UID, _SOP_CLASS_UID = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016
_NUMBER_OF_FRAMES, _PHOTOMETRIC, _PIXEL_DATA = 0x00280008, 0x00280004, 0x7FE00010
_SAMPLES, _ROWS, _COLUMNS, _BITS_ALLOCATED = 0x00280002, 0x00280010, 0x00280011, 0x00280100
_US_TAGS = (_SAMPLES, _ROWS, _COLUMNS, _BITS_ALLOCATED, 0x00280101, 0x00280103)
_WANTED = frozenset(
    {_STUDY_UID, _SERIES_UID, _SOP_INSTANCE_UID, _SOP_CLASS_UID, _NUMBER_OF_FRAMES, _PHOTOMETRIC, *_US_TAGS}
)
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")  # implicit VR
_NATIVE_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_META_READ = 1 << 16  # a file meta group is a few hundred bytes
_IS_RE = re.compile(r"[+-]?[0-9]+")


MAX_DEPTH_CEILING = 64  # pydicom reads 100 nested sequences and fails near 220 (RecursionError)


@dataclass(frozen=True)
class DatasetLimits:
    """How much of a peer's dataset the node takes on its word (config `dicom`: see README).

    `max_dataset_bytes`: the dataset as received (after the file meta), checked while it streams
    in. `max_inflated_bytes`: a Deflated Explicit VR dataset once inflated, checked while it
    inflates. `max_depth`: sequences nested in sequences; bounded so that recursive readers
    (pydicom, this module's walker) stay far from Python's recursion limit. Past any of them the
    dataset is refused with 0xC000.
    """

    max_dataset_bytes: int = 2047 << 20  # the store records sizes as 32-bit integers (PostgreSQL)
    max_inflated_bytes: int = 256 << 20
    max_depth: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= MAX_DEPTH_CEILING:
            raise ValueError(f"max_depth must be 1..{MAX_DEPTH_CEILING}")
        if self.max_dataset_bytes < 1 or self.max_inflated_bytes < 1:
            raise ValueError("dataset limits must be positive")


DEFAULT_LIMITS = DatasetLimits()


class _BeyondHead(Exception):
    """The walk needs bytes past the part of the dataset held in memory."""


class _ElementWalker:
    """Walks element headers (nested sequences included) to prove every length fits the bytes.

    This catches truncated datasets, bytes encoded in another transfer syntax than negotiated and
    sequences nested deeper than `max_depth`, at a cost of microseconds per element: values are
    skipped, never decoded. Every sequence's items are walked, of defined length or not. The
    recursion goes one `walk` and one `_sequence` per sequence level, so `max_depth` bounds it.
    `buf` may hold only the start of the data (`held` < the `end` walked to): the walk then raises
    `_BeyondHead` when it needs more, and skipping the pixel data to the end needs none.
    """

    def __init__(
        self,
        buf: bytes | bytearray | mmap.mmap,
        little_endian: bool,
        end: int | None = None,
        max_depth: int = DatasetLimits.max_depth,
    ) -> None:
        self.buf = buf
        self.held = len(buf)
        self.partial = end is not None and end > self.held
        self.max_depth = max_depth
        order = "<" if little_endian else ">"
        self.explicit_head = struct.Struct(order + "HH2sH")  # tag, VR, a short VR's length
        self.implicit_head = struct.Struct(order + "HHL")  # tag, length (and every item header)
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "L")
        self.values: dict[int, bytes] = {}
        self.pixel_length: int | None = None  # top-level Pixel Data: its value length, when defined
        self.fragments: int | None = None  # its items (offset table included), when encapsulated

    def walk(self, pos: int, end: int, explicit: bool, depth: int = 0, delimited: bool = False) -> int:
        """Walk one dataset's elements from `pos` to `end`, inside `depth` sequences.

        `delimited` (an item of undefined length): stop after its item delimiter, which must come
        before `end`. Returns the position after the last byte walked; raises `InstanceRefused`.
        """
        buf = self.buf
        while pos < end:
            if pos + 8 > end:
                raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"truncated element header at byte {pos}")
            if self.partial and pos + 12 > self.held:
                raise _BeyondHead
            if explicit:
                group, element, vr, length = self.explicit_head.unpack_from(buf, pos)
            else:
                group, element, length = self.implicit_head.unpack_from(buf, pos)
            if group == 0xFFFE:  # an item or a delimiter: tag and a 4-byte length in either syntax
                if element == 0xE00D and delimited:
                    return pos + 8
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND, f"unexpected item tag (FFFE,{element:04X}) at byte {pos}"
                )
            tag = group << 16 | element
            if not explicit:
                pos += 8
                sequence = length == _UNDEFINED_LENGTH or tag in _SQ_TAGS
                inner_explicit = False
            elif vr in _SHORT_VRS:
                pos += 8
                sequence = inner_explicit = False
            elif vr in _LONG_VRS:
                if pos + 12 > end:
                    raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"truncated element header at byte {pos}")
                (length,) = self.u32.unpack_from(buf, pos + 8)
                pos += 12
                sequence = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED_LENGTH)
                inner_explicit = vr != b"UN"  # undefined-length UN holds implicit VR LE
            else:
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND,
                    f"invalid VR {vr!r} in element ({group:04X},{element:04X}): "
                    "not encoded in the negotiated transfer syntax",
                )
            if tag == _PIXEL_DATA and depth == 0:
                pos = self._pixel_data(pos, end, length)
            elif sequence:
                pos = self._sequence(pos, end, length, inner_explicit, depth + 1)
            else:
                pos = self._value(pos, end, length, depth, tag)
        if delimited:
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "truncated: sequence item not closed")
        return pos

    def _sequence(self, pos: int, end: int, length: int, explicit: bool, depth: int) -> int:
        """Walk a sequence's items, each a dataset `depth` sequences deep; the position after it."""
        if depth > self.max_depth:
            raise InstanceRefused(
                STATUS_CANNOT_UNDERSTAND,
                f"sequences nested deeper than dicom.max_sequence_depth ({self.max_depth})",
            )
        delimited = length == _UNDEFINED_LENGTH
        if not delimited:
            if pos + length > end:
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND, f"truncated: sequence needs {length} bytes, {end - pos} left"
                )
            end = pos + length
        while pos + 8 <= end:
            if self.partial and pos + 8 > self.held:
                raise _BeyondHead
            group, element, item_length = self.implicit_head.unpack_from(self.buf, pos)
            pos += 8
            if (group, element) == (0xFFFE, 0xE0DD) and delimited:
                return pos
            if (group, element) != (0xFFFE, 0xE000):
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND,
                    f"({group:04X},{element:04X}) at byte {pos - 8} where a sequence item belongs",
                )
            if item_length == _UNDEFINED_LENGTH:
                pos = self.walk(pos, end, explicit, depth, delimited=True)
            elif pos + item_length > end:
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND,
                    f"truncated: sequence item needs {item_length} bytes, {end - pos} left",
                )
            else:
                pos = self.walk(pos, pos + item_length, explicit, depth)
        if delimited or pos != end:
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "truncated: sequence not closed")
        return pos

    def _pixel_data(self, pos: int, end: int, length: int) -> int:
        """Skip the top-level Pixel Data value, noting its length or, encapsulated, its item count."""
        if length != _UNDEFINED_LENGTH:
            self.pixel_length = length
            return self._value(pos, end, length, 0, _PIXEL_DATA)
        pos, self.fragments = self._fragments(pos, end)
        return pos

    def _fragments(self, pos: int, end: int) -> tuple[int, int]:
        """Skip an encapsulated value: items of defined length closed by a sequence delimiter.

        Returns the position after it and its number of items (the offset table included).
        """
        items = 0
        while pos + 8 <= end:
            if self.partial and pos + 8 > self.held:
                raise _BeyondHead
            group, element, length = self.implicit_head.unpack_from(self.buf, pos)
            pos += 8
            if (group, element) == (0xFFFE, 0xE0DD):
                return pos, items
            if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED_LENGTH:
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND,
                    f"encapsulated value holds ({group:04X},{element:04X}) of length {length:#x} "
                    f"at byte {pos - 8} where an item of defined length belongs",
                )
            if pos + length > end:
                raise InstanceRefused(
                    STATUS_CANNOT_UNDERSTAND,
                    f"truncated: encapsulated item {items} needs {length} bytes, {end - pos} left",
                )
            items += 1
            pos += length
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "truncated: encapsulated value not closed")

    def _value(self, pos: int, end: int, length: int, depth: int, tag: int) -> int:
        """Skip one value that is not a sequence; remember wanted top-level values."""
        if length == _UNDEFINED_LENGTH:  # only an encapsulated value (nested Pixel Data) may be
            return self._fragments(pos, end)[0]
        if pos + length > end:
            raise InstanceRefused(
                STATUS_CANNOT_UNDERSTAND,
                f"truncated: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                f"{end - pos} left",
            )
        if depth == 0 and tag in _WANTED:
            if pos + length > self.held:
                raise _BeyondHead
            self.values[tag] = bytes(self.buf[pos : pos + length])
        return pos + length


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


def inspect_dataset(
    path: Path,
    offset: int,
    transfer_syntax: str,
    head: bytes | bytearray = b"",
    size: int | None = None,
    limits: DatasetLimits = DEFAULT_LIMITS,
) -> DatasetIdentity:
    """Check the dataset that starts at `offset` in `path` and return its identifying UIDs.

    `head`, the dataset's first bytes, and `size`, the file's, spare reading the file back when the
    walk needs nothing past `head` (the usual image: header elements, then pixel data to the end).
    Raises `InstanceRefused` for truncated or mis-encoded bytes, sequences nested past
    `limits.max_depth`, a deflated dataset inflating past `limits.max_inflated_bytes`, missing or
    malformed UIDs and a few malformed image attributes (US lengths, Number of Frames) that would
    break loading later; OSError when the file cannot be read.
    """
    little_endian = transfer_syntax != ExplicitVRBigEndian
    explicit = transfer_syntax != ImplicitVRLittleEndian
    if head and size is not None and transfer_syntax != DeflatedExplicitVRLittleEndian:
        if size <= offset:
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "empty dataset")
        walker = _ElementWalker(head, little_endian, end=size - offset, max_depth=limits.max_depth)
        try:
            walker.walk(0, size - offset, explicit)
            return _checked_identity(walker, transfer_syntax)
        except _BeyondHead:
            pass  # read it from the file
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= offset:
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "empty dataset")
        with contextlib.ExitStack() as stack:
            mapped = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            data, start = mapped, offset
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                inflated = stack.enter_context(tempfile.TemporaryFile(dir=path.parent))
                _inflate(mapped, offset, limits.max_inflated_bytes, inflated)
                data, start = stack.enter_context(mmap.mmap(inflated.fileno(), 0, access=mmap.ACCESS_READ)), 0
            walker = _ElementWalker(data, little_endian, max_depth=limits.max_depth)
            walker.walk(start, len(data), explicit)
    return _checked_identity(walker, transfer_syntax)


_INFLATE_STEP = 1 << 20  # deflated bytes fed, and inflated bytes taken, at a time


def _inflate(deflated: mmap.mmap, offset: int, limit: int, out: IO[bytes]) -> None:
    """Inflate the raw deflate stream at `offset` of `deflated` into `out`.

    Memory stays bounded by `_INFLATE_STEP` whatever the ratio; `out` by `limit`. Raises
    `InstanceRefused` (0xC000) past `limit`, for a bad or truncated stream, or an empty dataset.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pos, pending = 0, offset, b""
    while not inflater.eof:
        if not pending:
            if pos >= len(deflated):
                raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "bad deflate stream: truncated")
            pending, pos = deflated[pos : pos + _INFLATE_STEP], pos + _INFLATE_STEP
        try:
            chunk = inflater.decompress(pending, _INFLATE_STEP)
        except zlib.error as exc:
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"bad deflate stream: {exc}") from None
        pending = inflater.unconsumed_tail
        total += len(chunk)
        if total > limit:
            raise InstanceRefused(
                STATUS_CANNOT_UNDERSTAND,
                f"deflated dataset inflates past dicom.max_inflated_bytes ({limit} bytes)",
            )
        out.write(chunk)
    if total == 0:
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "empty dataset")
    out.flush()


def inspect_part10(path: Path, limits: DatasetLimits = DEFAULT_LIMITS) -> DatasetIdentity:
    """`inspect_dataset` for a whole DICOM Part 10 file, whose file meta says where and how it is encoded."""
    with path.open("rb") as f:
        head = f.read(_META_READ)
    if head[128:132] != b"DICM":
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)")
    pos, transfer_syntax = 132, ""
    while pos + 8 <= len(head) and head[pos : pos + 2] == b"\x02\x00":  # group 0002, Explicit VR LE
        (element,) = struct.unpack_from("<H", head, pos + 2)
        if bytes(head[pos + 4 : pos + 6]) in _LONG_VRS:
            (length,) = struct.unpack_from("<L", head, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            pos += 8
        if element == 0x0010:
            transfer_syntax = _text(head[pos : pos + length])
        pos += length
    if not transfer_syntax or pos > len(head):
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "file meta without a transfer syntax")
    return inspect_dataset(path, pos, transfer_syntax, limits=limits)


def _checked_identity(walker: _ElementWalker, transfer_syntax: str) -> DatasetIdentity:
    """The walked dataset's identity, once its attributes and its Pixel Data are found sound."""
    identity = _identity(walker.values, walker.u16)
    _check_pixel_data(walker, transfer_syntax)
    return identity


def _check_pixel_data(walker: _ElementWalker, transfer_syntax: str) -> None:
    """Refuse Pixel Data that cannot hold the image its attributes describe.

    Native: at least Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of Frames bytes
    (YBR_FULL_422 keeps two samples a pixel; 1-bit data is packed); a longer value is accepted, as
    readers ignore the tail. Encapsulated: an offset table item and at least one fragment a frame.
    Raises `InstanceRefused` with 0xA900 (the value does not fit the image) or 0xC000 (wrong form).
    """
    if walker.pixel_length is None and walker.fragments is None:
        return  # no Pixel Data: nothing to check
    native = transfer_syntax in _NATIVE_SYNTAXES
    frames = _number_of_frames(walker.values.get(_NUMBER_OF_FRAMES))
    if not native:
        if walker.fragments is None:
            raise InstanceRefused(
                STATUS_CANNOT_UNDERSTAND, "Pixel Data is not encapsulated, as its transfer syntax requires"
            )
        if walker.fragments < 1 + frames:
            raise InstanceRefused(
                STATUS_DATASET_MISMATCH,
                f"encapsulated Pixel Data has {max(0, walker.fragments - 1)} fragment(s) "
                f"for {frames} frame(s)",
            )
        return
    if walker.pixel_length is None:
        raise InstanceRefused(
            STATUS_CANNOT_UNDERSTAND, "Pixel Data is encapsulated, but the transfer syntax is native"
        )
    image = [_us(walker, tag) for tag in (_ROWS, _COLUMNS, _BITS_ALLOCATED)]
    if None in image:
        return  # not described: a later step says what is missing
    rows, columns, bits = cast(list[int], image)
    samples = _us(walker, _SAMPLES) or 1
    if _text(walker.values.get(_PHOTOMETRIC, b"")) in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        samples = 2
    needed = (rows * columns * samples * bits * frames + 7) // 8
    if walker.pixel_length < needed:
        raise InstanceRefused(
            STATUS_DATASET_MISMATCH,
            f"Pixel Data holds {walker.pixel_length} bytes; Rows {rows} x Columns {columns} x "
            f"Samples per Pixel {samples} x Bits Allocated {bits} / 8 x Number of Frames {frames} "
            f"needs {needed}",
        )


def _us(walker: _ElementWalker, tag: int) -> int | None:
    """A remembered top-level US value, or None when absent or malformed (`_identity` refuses those)."""
    raw = walker.values.get(tag)
    if raw is None or len(raw) != walker.u16.size:
        return None
    return int(walker.u16.unpack(raw)[0])


def _number_of_frames(raw: bytes | None) -> int:
    """Number of Frames as an integer; 1 when absent or empty (malformed values: `_identity` refuses)."""
    text = _text(raw or b"")
    return max(1, int(text)) if _IS_RE.fullmatch(text) else 1


def _identity(values: dict[int, bytes], u16: struct.Struct) -> DatasetIdentity:
    """Validate the remembered raw values and build the identity.

    Study and Series Instance UID are required. An absent or empty SOP Class/Instance UID comes
    back empty: the C-STORE request carries them too (real files lack them, e.g. the J2K CT in
    testdata), so the caller takes the request's.
    """
    uids: dict[int, str] = {}
    for tag, name in (
        (_STUDY_UID, "StudyInstanceUID"),
        (_SERIES_UID, "SeriesInstanceUID"),
        (_SOP_INSTANCE_UID, "SOPInstanceUID"),
        (_SOP_CLASS_UID, "SOPClassUID"),
    ):
        uid = _text(values.get(tag, b""))
        if not uid and tag in (_STUDY_UID, _SERIES_UID):
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"missing {name}")
        if uid and (len(uid) > 64 or not _UID_RE.fullmatch(uid)):
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"malformed {name}")
        uids[tag] = uid
    frames = values.get(_NUMBER_OF_FRAMES)
    if frames is not None and _text(frames) and not _IS_RE.fullmatch(_text(frames)):
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"malformed NumberOfFrames {_text(frames)!r}")
    for tag in _US_TAGS:
        raw = values.get(tag)
        if raw is not None and len(raw) != u16.size:
            raise InstanceRefused(
                STATUS_CANNOT_UNDERSTAND, f"malformed US element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
            )
    return DatasetIdentity(uids[_STUDY_UID], uids[_SERIES_UID], uids[_SOP_INSTANCE_UID], uids[_SOP_CLASS_UID])


# --- encoding the two small things written per instance ------------------------------------------
# pydicom's writer costs ~0.3 ms for each of these; they are fixed layouts, so they are built here.


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _explicit_le(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (Explicit VR Little Endian, PS3.10 7.1)."""
    body = b"".join(
        (
            struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _explicit_le(0x0002, b"UI", _even(sop_class_uid, b"\0")),
            _explicit_le(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
            _explicit_le(0x0010, b"UI", _even(transfer_syntax, b"\0")),
            _explicit_le(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _explicit_le(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            _explicit_le(0x0016, b"AE", _even(source_ae_title, b" ")) if source_ae_title else b"",
        )
    )
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _implicit_le(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def c_store_rsp_command(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE-RSP without optional elements (Implicit VR LE, PS3.7 9.3.1.2)."""
    elements = b"".join(
        (
            _implicit_le(0x0002, _even(sop_class_uid, b"\0")),
            _implicit_le(0x0100, struct.pack("<H", 0x8001)),
            _implicit_le(0x0120, struct.pack("<H", message_id)),
            _implicit_le(0x0800, struct.pack("<H", 0x0101)),  # no dataset
            _implicit_le(0x0900, struct.pack("<H", status)),
            _implicit_le(0x1000, _even(sop_instance_uid, b"\0")),
        )
    )
    return _implicit_le(0x0000, struct.pack("<L", len(elements))) + elements


def parse_c_store_rq(command: bytes) -> tuple[int, str, str] | None:
    """(Message ID, Affected SOP Class UID, Affected SOP Instance UID) of a C-STORE-RQ with a dataset.

    None for anything else or anything odd; the caller then leaves the message to pynetdicom.
    """
    values: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(command):
            return None
        values[element] = command[pos : pos + length]
        pos += length
    if pos != len(command):
        return None
    us = {
        e: struct.unpack("<H", v)[0]
        for e, v in values.items()
        if e in (0x0100, 0x0110, 0x0800) and len(v) == 2
    }
    sop_class, sop_instance = _text(values.get(0x0002, b"")), _text(values.get(0x1000, b""))
    if us.get(0x0100) != 0x0001 or us.get(0x0800, 0x0101) == 0x0101 or 0x0110 not in us:
        return None
    if not sop_class or not sop_instance:
        return None
    return us[0x0110], sop_class, sop_instance


# --- pynetdicom, narrowed for speed ---------------------------------------------------------------

_IDLE_WAIT_S = 0.02  # upper bound of an idle DUL/association loop; events end the wait at once
INCOMING_PREFIX = ".rx-"  # incoming files (made ahead, being received, or the handler's)
_RECEIVING_MODE = 0o200  # an incoming file before its dataset is complete: write-only for its owner


def received_completely(status: os.stat_result) -> bool:
    """Whether an incoming file holds a whole dataset (False: made ahead unused, or cut off)."""
    return status.st_size > 0 and status.st_mode & 0o777 != _RECEIVING_MODE


def _fsync(path: Path | str, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries durable (new names in it)."""
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: Path | str) -> None:
    _fsync(path, 0)


_READ_CHUNK = 256 << 10  # the socket buffer's usual size, and so the largest single read
_CONTROL_PDU_LIMIT = _READ_CHUNK  # any PDU but P-DATA-TF (A-ASSOCIATE-RQ: docs/design.md)
_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_EXPECTED_PDUS = {"Sta2": frozenset({0x01, 0x07}), "Sta6": frozenset({0x04, 0x05, 0x07})}  # acceptor's
_ABORT_NOT_SPECIFIED, _ABORT_UNRECOGNIZED_PDU, _ABORT_UNEXPECTED_PDU = 0x00, 0x01, 0x02
_ABORT_INVALID_PARAMETER = 0x06  # A-ABORT reasons of the service provider (PS3.8 9.3.8)


class _WakingQueue(queue.Queue[Any]):
    """A pynetdicom queue that also wakes whoever waits for it (the DUL's `select`, the association
    loop's `get_msg`)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _FastDUL(DULServiceProvider):
    """DUL whose idle loop blocks in `select` on the socket and a wake pipe instead of sleeping 1 ms.

    pynetdicom polls: `time.sleep(_run_loop_delay)` whenever a loop found nothing to do, which costs
    ~1 ms of latency for every response sent and every request received. Here the loop never
    sleeps (see `run_reactor`) and `_is_transport_event` waits until the peer sends bytes or the
    association queues a primitive.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _WakingQueue(self.wake)
        self.for_user = threading.Event()  # set when a primitive is put for the association thread
        self.to_user_queue = _WakingQueue(self.for_user.set)
        self._last_activity = time.monotonic()  # a PDU read or a primitive sent: the idle timeout's start

    def wake(self) -> None:
        """Interrupt the idle `select`."""
        with contextlib.suppress(OSError):  # full pipe (already woken) or closed
            self._wake_w.send(b"\0")

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _is_transport_event(self) -> bool:
        """Block until the peer's bytes arrive (True after reading a PDU) or something is queued."""
        assoc_sock = cast(AssociationSocket, self.socket)
        if self.state_machine.current_state == "Sta13" and self.assoc.requestor.primitive is None:
            assoc_sock.close()  # aborted a peer that never sent a request: read no more of its bytes
            return False
        sock = assoc_sock.socket if assoc_sock is not None else None
        if sock is None or not assoc_sock._is_connected:
            if select.select([self._wake_r], [], [], _IDLE_WAIT_S)[0]:
                self._drain()
            return False
        if cast(_FastSocket, assoc_sock).buffered or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            self._read_pdu()
            return True
        try:
            ready = select.select([sock, self._wake_r], [], [], _IDLE_WAIT_S)[0]
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as AssociationSocket.ready does
            return False
        if self._wake_r in ready:
            self._drain()
        if sock in ready:
            self._read_pdu()
            return True
        if not ready and self.state_machine.current_state == "Sta6":
            idle = self._config.idle_timeout
            if time.monotonic() - self._last_activity > idle:
                self.refuse(_ABORT_NOT_SPECIFIED, f"no PDU for {idle:g} s (dicom.idle_timeout_s)")
        return False

    @property
    def _config(self) -> _ReceiverConfig:
        return cast(_Association, self.assoc).conn.receiver.config

    def run_reactor(self) -> None:
        """pynetdicom's loop without its `time.sleep` between turns; frees the acceptor at the end.

        pynetdicom sleeps `_run_loop_delay` whenever a turn queued no event. Even a zero sleep is a
        system call that yields the core, and a P-DATA-TF taken by `_read_pdu` queues no event, so
        it cost about a fifth of the receive rate. Here a turn blocks only in `_is_transport_event`,
        and looks at its queues without their locks and without raising `queue.Empty` (most turns
        queue nothing; that cost the node another 5-10 %): only this thread takes from them, and
        a primitive put from another thread wakes the `select`.

        When the loop ends before any A-ASSOCIATE-RQ (garbage bytes, a bare connect-and-close, the
        ARTIM timer: no whole request within `pdu_timeout`), the acceptor would wait for a request,
        holding the connection and a slot of `max_associations`; `None` on the user queue is what
        that wait returns on timeout, so it ends at once. The idle timeout is checked in
        `_is_transport_event`, as pynetdicom's association thread does (its own check is off).
        """
        try:
            while not self._kill_thread:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self.artim_timer.expired:
                    if self.state_machine.current_state == "Sta2":
                        self._log_peer(
                            f"no whole A-ASSOCIATE-RQ within {self._config.pdu_timeout:g} s of the "
                            "connection (dicom.pdu_timeout_s); closing"
                        )
                    self.event_queue.put("Evt18")
                try:
                    queued = bool(self.to_provider_queue.queue) and self._process_recv_primitive()
                    # events already queued go first: a blocking read would leave them until the
                    # peer sends again (an A-ASSOCIATE-RQ behind Evt5 waited out the idle wait)
                    if queued:
                        self._last_activity = time.monotonic()
                    elif not self.event_queue.queue:
                        self._is_transport_event()
                except Exception:
                    LOGGER.exception(
                        "%s: error in the DICOM upper layer; aborting the association",
                        cast(_Association, self.assoc).conn.describe(),
                    )
                    self._abort(_ABORT_NOT_SPECIFIED)
                    return
                if not self.event_queue.queue:  # no lock, no exception: most turns queue nothing
                    continue
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    continue
                self.state_machine.do_action(event)
                if self.state_machine.current_state == "Sta1" and self.assoc.requestor.primitive is None:
                    return  # closed before a request: nothing more can happen here
        finally:
            if self.assoc.requestor.primitive is None:
                self.to_user_queue.put(cast(Any, None))

    def _log_peer(self, what: str) -> None:
        """One log line about the peer: its address, its calling AE title once known, `what`; none
        once the acceptor dropped the connection (it said why)."""
        conn = cast(_Association, self.assoc).conn
        if not conn.dropped:
            LOGGER.warning("%s: %s", conn.describe(), what)

    def refuse(self, reason: int, what: str) -> None:
        """A peer broke the protocol or a limit: log it, abort, read nothing more."""
        self._log_peer(f"{what}; A-ABORT")
        self._abort(reason)

    def _abort(self, reason: int) -> None:
        """As pynetdicom's reactor does on an exception: send A-ABORT past the state machine, stop."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02  # the service provider
        abort_pdu.reason_diagnostic = reason
        cast(AssociationSocket, self.socket).send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _read_pdu(self) -> None:
        """Read one PDU, its type and declared length checked before any of its body is read.

        A PDU the acceptor cannot expect in its state (anything but an A-ASSOCIATE-RQ or an A-ABORT
        before a request; an A-ASSOCIATE-AC, -RJ or -RQ, or an A-RELEASE-RP, once established), an
        unknown type, a P-DATA-TF longer than the `max_pdu` we announced, any other PDU longer than
        `_CONTROL_PDU_LIMIT`, or a PDU whose bytes stop coming for `pdu_timeout` (before the
        association: a request not whole within `pdu_timeout` of the connection) is refused:
        one log line, an A-ABORT, nothing more read. So no read holds more than its bound.

        A P-DATA-TF of an established association goes straight to the DIMSE provider. That is
        what the state machine's DT-2 does (Sta6 + Evt10 → Sta6), here without the event queue, the
        PDU object and a copy: the PDV values are views of the socket buffer that the provider
        writes to the spool file. Anything else, or anything while events are queued (they must
        keep their order), is decoded by pynetdicom and goes through its state machine.
        """
        sock = cast(_FastSocket, self.socket)
        state = self.state_machine.current_state
        sock.read_by(time.monotonic() + self.artim_timer.remaining if state == "Sta2" else None)
        try:
            self._read_checked_pdu(sock, state)
        except TimeoutError:
            timeout = self._config.pdu_timeout
            self.refuse(
                _ABORT_NOT_SPECIFIED,
                f"no whole A-ASSOCIATE-RQ within {timeout:g} s of the connection (dicom.pdu_timeout_s)"
                if state == "Sta2"
                else f"a PDU stalled: no byte for {timeout:g} s (dicom.pdu_timeout_s)",
            )
        except OSError:  # reset by the peer: as a close
            self.event_queue.put("Evt17")
        self._last_activity = time.monotonic()

    def _read_checked_pdu(self, sock: _FastSocket, state: str) -> None:
        header = sock.peek(6)
        if len(header) < 6:
            if header:
                self._log_peer(f"closed the connection inside a PDU header ({len(header)} of 6 bytes)")
            self.event_queue.put("Evt17")
            return
        pdu_type = header[0]
        (length,) = struct.unpack_from(">L", header, 2)
        name = _PDU_NAMES.get(pdu_type)
        if name is None:
            self.refuse(_ABORT_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
            return
        expected = _EXPECTED_PDUS.get(state)
        if expected is not None and pdu_type not in expected:
            when = "before an A-ASSOCIATE-RQ" if state == "Sta2" else "in an established association"
            self.refuse(_ABORT_UNEXPECTED_PDU, f"unexpected {name} PDU {when}")
            return
        if pdu_type == 0x04:
            limit, setting = self._config.max_pdu, "dicom.max_pdu"
        else:
            limit, setting = _CONTROL_PDU_LIMIT, "the limit for PDUs other than P-DATA-TF"
        if length > limit:
            self.refuse(
                _ABORT_INVALID_PARAMETER, f"{name} PDU of {length} bytes, over {setting} ({limit} bytes)"
            )
            return
        if state == "Sta6" and pdu_type == 0x04 and not self.event_queue.queue:
            sock.skip(6)
            self._deliver_pdata(sock.take_view(length), length)
            return
        data = sock.take(6 + length)
        if len(data) < 6 + length:
            self._closed_inside(name, len(data) - 6, length)
            return
        fault = associate_rq_fault(data) if pdu_type == 0x01 else None
        if fault is not None:
            self.refuse(_ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {fault}")
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            self.refuse(_ABORT_INVALID_PARAMETER, f"undecodable {name} PDU: {exc}")
            return
        if pdu_type == 0x01 and data[6:8] != b"\x00\x01":  # pynetdicom rejects it (AE-6)
            self._log_peer(f"A-ASSOCIATE-RQ of protocol version 0x{data[6:8].hex()}; A-ASSOCIATE-RJ")
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _closed_inside(self, name: str, received: int, length: int) -> None:
        self._log_peer(f"closed the connection inside its {name} PDU ({received} of {length} bytes)")
        self.event_queue.put("Evt17")

    def _deliver_pdata(self, body: memoryview, length: int) -> None:
        try:
            if len(body) < length:
                self._closed_inside("P-DATA-TF", len(body), length)
                return
            try:
                items = pdv_items(body)
            except ValueError as exc:
                self.refuse(_ABORT_INVALID_PARAMETER, f"invalid P-DATA-TF PDU: {exc}")
                return
            cast(_SpoolingDIMSE, self.assoc.dimse).receive_items(items)
            del items
        finally:
            body.release()

    def send_pdata_now(self, context_id: int, value: bytes) -> bool:
        """Send one PDV at once if that keeps the DUL's order (on its own thread, nothing queued)."""
        if (
            threading.current_thread() is not self
            or self.state_machine.current_state != "Sta6"
            or not self.to_provider_queue.empty()
        ):
            return False
        pdu = struct.pack(">BBLLB", 0x04, 0, 4 + 1 + len(value), 1 + len(value), context_id) + value
        cast(AssociationSocket, self.socket).send(pdu)
        return True

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """P-DATA-TF without pynetdicom's PDU objects, item copies and per-PDU events (see `_PDataTF`)."""
        if bytestream[0] == 0x04:
            return _PDataTF(bytestream), "Evt10"
        return super()._decode_pdu(bytestream)

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's, but wakes the loop and joins it instead of polling `is_alive`."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def close_wake_pipe(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


_ASSOCIATE_RQ_FIXED = 68  # protocol version, reserved, called and calling AE titles, reserved
_ITEMS_WITH_SUB_ITEMS = {0x20: 4, 0x50: 0}  # presentation context (after its ID), user information


def associate_rq_fault(pdu: bytes | bytearray) -> str | None:
    """What makes a whole A-ASSOCIATE-RQ PDU malformed, or None (PS3.8 9.3.2).

    Every item and sub-item must fit the PDU, and the application context and at least one
    presentation context must be there: pynetdicom decodes leniently (a request cut after its AE
    titles was accepted, with no context at all).
    """
    end = len(pdu)
    pos = 6 + _ASSOCIATE_RQ_FIXED
    if end < pos:
        return f"{end - 6} bytes, shorter than its fixed fields ({_ASSOCIATE_RQ_FIXED})"
    seen = set()
    while pos < end:
        item_type, item_end = _item_span(pdu, pos, end)
        if item_end > end:
            return f"item 0x{item_type:02X} at byte {pos} overruns the PDU"
        skip = _ITEMS_WITH_SUB_ITEMS.get(item_type)
        if skip is not None:
            sub = pos + 4 + skip
            while sub < item_end:
                sub_type, sub = _item_span(pdu, sub, item_end)
                if sub > item_end:
                    return f"sub-item 0x{sub_type:02X} overruns item 0x{item_type:02X} at byte {pos}"
        seen.add(item_type)
        pos = item_end
    for item_type, what in ((0x10, "application context"), (0x20, "presentation context")):
        if item_type not in seen:
            return f"no {what} item"
    return None


def _item_span(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """An item's type and where it ends (past `end` when its header or value does not fit)."""
    if pos + 4 > end:
        return data[pos], end + 1
    return data[pos], pos + 4 + struct.unpack_from(">H", data, pos + 2)[0]


def pdv_items(pdu: memoryview) -> list[tuple[int, memoryview]]:
    """(Presentation context ID, message control header + fragment) of each PDV item of a P-DATA-TF
    body (the PDU without its 6-byte header), as views of `pdu`. Raises ValueError if malformed."""
    items = []
    offset, end = 0, len(pdu)
    while offset < end:
        if offset + 5 > end:
            raise ValueError("truncated PDV item header")
        (length,) = struct.unpack_from(">L", pdu, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"PDV item length {length} does not fit the PDU")
        items.append((pdu[offset + 4], pdu[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    if not items:
        raise ValueError("no PDV item")
    return items


class _PDataTF:
    """A P-DATA-TF that came through pynetdicom's reader, decoded only as far as DT-2 needs.

    pynetdicom copies the PDU to bytes, builds an item object per PDV, copies each value and fires
    EVT_DATA_RECV/EVT_PDU_RECV, at ~50 µs a PDU. Here each value is copied once. Those two events do
    not fire for P-DATA (nothing here binds them). A malformed item raises, which pynetdicom's reader
    turns into Evt19 (A-ABORT).
    """

    def __init__(self, bytestream: bytearray) -> None:
        with memoryview(bytestream) as view:
            self.items = [[cid, bytes(value)] for cid, value in pdv_items(view[6:])]

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive.presentation_data_value_list = cast(Any, self.items)
        return primitive


class _FastSocket(AssociationSocket):
    """Reads through one buffer filled by large `recv_into` calls, instead of 4 KiB `recv` calls.

    One system call usually brings several small PDUs, or a whole large one with the next header,
    so the DUL reads a PDU without waiting in `select` in between. Bytes in the buffer are invisible
    to `select`: `_FastDUL._is_transport_event` asks `buffered` first.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, timeout: float) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._buf = bytearray(_READ_CHUNK)
        self._start = self._end = 0
        self._timeout = timeout
        self._deadline: float | None = None
        client_socket.settimeout(timeout)

    @property
    def buffered(self) -> bool:
        return self._end > self._start

    def read_by(self, deadline: float | None) -> None:
        """Reads from now on raise TimeoutError past `deadline` (`time.monotonic`); with None, when
        no byte comes for the socket's `timeout` (sends too)."""
        if deadline is None and self._deadline is not None:
            cast(socket.socket, self.socket).settimeout(self._timeout)
        self._deadline = deadline

    def take(self, nr_bytes: int) -> bytearray:
        """The next `nr_bytes` (fewer if the peer closed), copied."""
        self._fill(nr_bytes)
        return self._take(min(nr_bytes, self._end - self._start))

    def peek(self, nr_bytes: int) -> bytes:
        """The next `nr_bytes` (fewer if the peer closed), left unread."""
        self._fill(nr_bytes)
        return bytes(self._buf[self._start : min(self._start + nr_bytes, self._end)])

    def skip(self, nr_bytes: int) -> None:
        """Drop `nr_bytes` already peeked."""
        self._take_span(nr_bytes)

    def take_view(self, nr_bytes: int) -> memoryview:
        """The next `nr_bytes` (fewer if the peer closed) as a view of the buffer, without a copy.

        Release it before reading again: the buffer cannot grow while a view of it exists.
        """
        self._fill(nr_bytes)
        start, end = self._take_span(min(nr_bytes, self._end - self._start))
        return memoryview(self._buf)[start:end]

    def _fill(self, nr_bytes: int) -> None:
        """Read until `nr_bytes` are buffered or the peer closed; TimeoutError as `read_by` says."""
        sock = cast(socket.socket, self.socket)
        while self._end - self._start < nr_bytes:
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            if self._start:  # keep the unread tail at the front
                self._buf[: self._end - self._start] = self._buf[self._start : self._end]
                self._end -= self._start
                self._start = 0
            if len(self._buf) - self._end < _READ_CHUNK // 4 or len(self._buf) < nr_bytes:
                self._buf.extend(bytes(max(nr_bytes, _READ_CHUNK) - (len(self._buf) - self._end)))
            with memoryview(self._buf) as view:
                n = sock.recv_into(view[self._end :])
            if not n:  # closed: the caller gets what there is, as AssociationSocket.recv does
                return
            self._end += n

    def _take_span(self, nr_bytes: int) -> tuple[int, int]:
        start = self._start
        self._start += nr_bytes
        if self._start == self._end:
            self._start = self._end = 0
        return start, start + nr_bytes

    def _take(self, nr_bytes: int) -> bytearray:
        start, end = self._take_span(nr_bytes)
        return self._buf[start:end]


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's `sync_file_range` (not in `os`), or None where libc lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait
_WRITEBACK_STEP = 256 << 10
_HEAD_BYTES = 64 << 10  # header elements before the pixel data; more is read back from the file
_PAGE = 4096


class _IncomingFiles:
    """Empty incoming files, made ahead by a thread of the receiving process with their names durable.

    A C-STORE then starts writing at once, and the names cost one fsync of the directory for each
    batch instead of one per instance: a handler that fsyncs the file after the last byte has it
    durable under this name, so it can make the final name durable later and for many instances at
    once. Each file is created write-only for its owner and `_Spool.complete` gives it its usual
    mode once its dataset is whole (`received_completely`). If the thread falls behind, or cannot
    create files, `take` creates one itself and raises what the file system says. The files out
    for writing are counted (`take`, `give_back`) so a writer knows whether others write at once.
    """

    def __init__(self, directory: Path, tag: str, file_mode: int, batch: int = 32) -> None:
        self.file_mode = file_mode  # of a complete file (`_Spool.complete`)
        self._prefix = os.path.join(directory, f"{INCOMING_PREFIX}{tag}-")
        self._directory = str(directory)
        self._batch = batch
        self._numbers = itertools.count(1)
        self._ready: collections.deque[tuple[str, int]] = collections.deque()
        self._wanted = threading.Event()
        self._closed = False
        self._writing = 0  # taken and not given back
        self._writing_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="radgate-incoming-files", daemon=True)
        self._thread.start()
        self._wanted.set()

    @property
    def others_writing(self) -> bool:
        """Whether another file of this process is being written too (the caller holds one)."""
        return self._writing > 1

    def take(self) -> tuple[str, int]:
        """A new empty file: its path and a write-only descriptor, now the caller's until `give_back`."""
        if len(self._ready) <= self._batch // 2:
            self._wanted.set()
        try:
            made = self._ready.popleft()
        except IndexError:
            made = self._make(1)[0]
        with self._writing_lock:
            self._writing += 1
        return made

    def give_back(self) -> None:
        """A file from `take` is no longer written (closed, whatever became of it)."""
        with self._writing_lock:
            self._writing -= 1

    def close(self) -> None:
        """Stop making files and remove those not taken."""
        self._closed = True
        self._wanted.set()
        self._thread.join(timeout=5)
        while self._ready:
            path, fd = self._ready.popleft()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _run(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while not self._closed and len(self._ready) < self._batch:
                try:
                    made = self._make(self._batch)
                except OSError as exc:  # take() creates its own, and each C-STORE reports the error
                    LOGGER.warning("cannot make incoming files in %s: %s", self._directory, exc)
                    break
                self._ready.extend(made)  # close() removes those it finds after the thread ended

    def _make(self, count: int) -> list[tuple[str, int]]:
        made: list[tuple[str, int]] = []
        try:
            for _ in range(count):
                path = f"{self._prefix}{next(self._numbers)}.dcm"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                made.append((path, os.open(path, flags, _RECEIVING_MODE)))
            fsync_dir(self._directory)
        except OSError:
            for path, fd in made:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return made


class _Spool:
    """The file a C-STORE dataset streams into; shaped like the NamedTemporaryFile pynetdicom expects.

    A write that fails (disk full, file size limit, permissions) must not end the association: the
    rest of the dataset still arrives and is dropped, the partial file is removed at once, and the
    request is answered 0xA700 (out of resources) from `error`. A dataset that grows past
    `max_dataset_bytes` is handled alike, as soon as it does, and answered from `refused` (0xC000).

    The handler of a durable node fsyncs the file before it answers, on the path of every
    acknowledgement. So whole pages start their way to the disk while the rest of the dataset is
    still arriving (`sync_file_range`, asynchronous, each 256 KiB), and the tail as soon as the
    dataset is whole, while the dataset is checked and the file linked: the fsync then mostly waits
    for the inode (0.35 ms instead of 0.6 ms for a 512 KB slice here). That shortens the wait of a
    lone sender. While other datasets arrive in the same process, the CPU is what limits, and
    the calls are skipped: each fsync then writes its file in one go, for less CPU per instance
    (6 % more images/s over 4 associations here). Handing these calls and the fsync to disk
    threads was slower: the threads then queue for the GIL.
    """

    def __init__(
        self, files: _IncomingFiles, header: bytes, max_dataset_bytes: int = DatasetLimits.max_dataset_bytes
    ) -> None:
        self.file = self  # pynetdicom calls `_data_set_file.file.flush()` after each fragment
        self.dataset_offset = len(header)
        self.max_size = len(header) + max_dataset_bytes
        self.error: OSError | None = None
        self.refused: InstanceRefused | None = None
        self.size = 0
        self.head = bytearray()  # the dataset's first bytes, for `inspect_dataset`
        self._written_back = 0
        self._f: FileIO | None = None
        self._files = files
        self._taken = False  # the file is ours until `close` gives it back
        try:
            self.name, fd = files.take()
            self._taken = True
        except OSError as exc:
            self.name, self.error = "", exc
        self.path = Path(self.name)
        if self.error is None:
            self._f = FileIO(fd, "wb")  # closed when the message completes
            self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        if self._f is None or self.error is not None:
            return
        view = memoryview(data)
        if self.size + len(view) > self.max_size:
            self.refused = InstanceRefused(
                STATUS_CANNOT_UNDERSTAND,
                f"dataset larger than dicom.max_dataset_bytes ({self.max_size - self.dataset_offset} bytes)",
            )
            self.discard()
            return
        if self.dataset_offset <= self.size and len(self.head) < _HEAD_BYTES:
            self.head += view[: _HEAD_BYTES - len(self.head)]
        try:
            while view:  # an unbuffered write may be short (e.g. up to a file size limit)
                written = self._f.write(view)
                self.size += written
                view = view[written:]
        except OSError as exc:
            self.error = exc
            self.discard()
            return
        whole_pages = self.size & ~(_PAGE - 1)  # a partial page would be written twice
        if whole_pages - self._written_back >= _WRITEBACK_STEP:
            self._start_writeback(whole_pages)

    def _start_writeback(self, end: int) -> None:
        """Start writing the bytes up to `end` to the disk, unless other files are being written too."""
        if _SYNC_FILE_RANGE is None or self._f is None or self._files.others_writing:
            return
        start = self._written_back
        if end > start:  # a failure shows again in the handler's fsync
            _SYNC_FILE_RANGE(self._f.fileno(), start, end - start, _SYNC_FILE_RANGE_WRITE)
            self._written_back = end

    def flush(self) -> None:
        """Unbuffered: nothing to flush."""

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None  # later writes of the dataset are dropped
        if self._taken:
            self._files.give_back()
            self._taken = False

    def complete(self) -> None:
        """The whole dataset is in: start writing back the tail, give the file its usual mode
        (`received_completely`), close it."""
        if self._f is not None:
            try:
                self._start_writeback(self.size)
                os.fchmod(self._f.fileno(), self._files.file_mode)
            except OSError as exc:
                self.error = exc
        self.close()

    def discard(self) -> None:
        self.close()
        if self.name:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@dataclass
class _PendingStore:
    """A C-STORE-RQ whose dataset is streaming into its spool file."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    spool: _Spool


class _SpoolingDIMSE(DIMSEServiceProvider):
    """DIMSE provider that streams C-STORE datasets into the incoming directory and answers them.

    The usual case, a C-STORE-RQ whose command set arrives in one fragment, never builds pydicom
    Datasets or pynetdicom messages: the command is parsed by hand, the dataset fragments are
    written to the spool as they come, and the request is served right here, on the DUL thread,
    with a hand-encoded response. The peer waits for that response anyway; going through the
    association thread costs two thread wake-ups per instance (on a loaded machine, two waits for
    the scheduler) and pynetdicom's generic decoding about as much CPU again.

    Everything else takes pynetdicom's path, with the dataset still spooled (no global
    `_config.STORE_RECV_CHUNKED_DATASET`, no flush per fragment) and `get_msg` waiting on the queue
    instead of pynetdicom's 1 ms reactor sleep. C-ECHO is served on the DUL thread too; messages on
    unknown contexts, which pynetdicom answers by aborting, go through the association thread.
    """

    def __init__(self, assoc: _Association) -> None:
        super().__init__(assoc)
        self._conn = assoc.conn
        self._store: _PendingStore | None = None
        self.msg_queue = _WakingQueue(cast(_FastDUL, assoc.dul).for_user.set)

    def discard_partial(self) -> None:
        """Remove the spool of a dataset the association ended in the middle of."""
        if self._store is not None:
            self._store.spool.discard()
            self._store = None
        msg = self.message
        if msg is not None and isinstance(msg._data_set_file, _Spool):
            msg._data_set_file.discard()

    def _send_c_store_rsp(
        self, context_id: int, sop_class: str, sop_instance: str, message_id: int, status: int
    ) -> None:
        if not 0 <= status <= 0xFFFF:
            LOGGER.error("handler returned status %r, answering 0x%04X", status, STATUS_CANNOT_UNDERSTAND)
            status = STATUS_CANNOT_UNDERSTAND
        value = b"\x03" + c_store_rsp_command(
            sop_class, sop_instance, message_id, status
        )  # last command fragment
        if cast(_FastDUL, self.dul).send_pdata_now(context_id, value):
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [cast(Any, [context_id, value])]
        self.dul.send_pdu(pdata)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A plain C-STORE-RSP is encoded by hand into one P-DATA; everything else as pynetdicom does."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
        ):
            self._send_c_store_rsp(
                context_id,
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.MessageIDBeingRespondedTo),
                int(cast(int, primitive.Status)),
            )
            return
        super().send_msg(primitive, context_id)

    def get_msg(self, block: bool = False) -> Any:
        """Without `block` (the association loop's poll): the next message, waiting at most
        `_IDLE_WAIT_S`, and returning at once when an ACSE primitive is queued for the association
        thread too, so that a release or abort is answered without waiting out the idle wait."""
        if block:
            return super().get_msg(True)
        arrived = cast(_FastDUL, self.dul).for_user
        arrived.clear()  # before looking: a put from now on sets it again
        try:
            return self.msg_queue.get_nowait()
        except queue.Empty:
            pass
        if not self.dul.to_user_queue.queue:
            arrived.wait(_IDLE_WAIT_S)
        try:
            return self.msg_queue.get_nowait()
        except queue.Empty:
            return None, None

    def receive_primitive(self, primitive: Any) -> None:
        """A P-DATA through the state machine (DT-2)."""
        self.receive_items(primitive.presentation_data_value_list)

    def receive_items(self, items: Sequence[tuple[int, bytes | memoryview] | list[Any]]) -> None:
        """Take each fragment of a P-DATA: the fast C-STORE path when it applies, else pynetdicom's."""
        pdvs = list(items)
        while pdvs:
            if self._store is None:
                if self.message is None and self._start_store(*pdvs[0]):
                    pdvs.pop(0)
                    continue
                primitive = P_DATA()
                primitive.presentation_data_value_list = cast(Any, [[cid, bytes(data)] for cid, data in pdvs])
                self._receive_with_pynetdicom(primitive)
                return
            context_id, data = pdvs.pop(0)
            if data[0] & 1 or context_id != self._store.context_id:
                self._refuse("a command or another context's fragment arrived inside a dataset")
                return
            self._store.spool.write(memoryview(data)[1:])
            if data[0] & 2:
                self._finish_store()

    def _start_store(self, context_id: int, data: bytes | memoryview) -> bool:
        """Begin the fast path if `data` is a whole C-STORE-RQ command on a storage context."""
        cx = self.assoc._accepted_cx.get(context_id)
        if data[0] & 3 != 3 or cx is None:
            return False
        parsed = parse_c_store_rq(bytes(data[1:]))
        if parsed is None or parsed[1] != str(cx.abstract_syntax):
            return False
        message_id, sop_class, sop_instance = parsed
        ts = str(cast(list[str], cx.transfer_syntax)[0])
        spool = self._conn.open_spool(sop_class, sop_instance, ts)
        self._store = _PendingStore(context_id, message_id, sop_class, sop_instance, ts, spool)
        return True

    def _finish_store(self) -> None:
        store = cast(_PendingStore, self._store)
        self._store = None
        store.spool.complete()
        status = self._conn.store(
            store.spool, store.transfer_syntax, store.sop_class_uid, store.sop_instance_uid
        )
        self._send_c_store_rsp(
            store.context_id, store.sop_class_uid, store.sop_instance_uid, store.message_id, status
        )

    def _refuse(self, what: str) -> None:
        """A message that breaks DIMSE: drop what it left, log it, abort (`_FastDUL.refuse`)."""
        self.discard_partial()
        self.message = None
        cast(_FastDUL, self.dul).refuse(_ABORT_NOT_SPECIFIED, what)

    def _receive_with_pynetdicom(self, primitive: P_DATA) -> None:
        """pynetdicom's decoding, spooling any C-STORE dataset as soon as its command is complete.

        A fragment on a presentation context not accepted, or a message that does not decode, is
        refused with an A-ABORT (PS3.7 and PS3.8 leave nothing else to answer it with).
        """
        for context_id, _ in cast(list[tuple[int, bytes]], primitive.presentation_data_value_list):
            if context_id not in self.assoc._accepted_cx:
                self._refuse(f"a message on presentation context {context_id}, which was not accepted")
                return
        try:
            decoded = self._decode_with_pynetdicom(primitive)
        except Exception as exc:
            self._refuse(f"a DIMSE message that does not decode ({type(exc).__name__}: {exc})")
            return
        if decoded is None:
            return
        context_id, d_primitive = decoded
        if (
            isinstance(d_primitive, (C_STORE, C_ECHO))
            and d_primitive.is_valid_request
            and self.assoc.is_established  # the service classes drop the response until it is
        ):
            self.assoc._serve_request(d_primitive, context_id)
        else:  # anything else takes pynetdicom's path through the association thread
            self.msg_queue.put(cast(Any, (context_id, d_primitive)))

    def _decode_with_pynetdicom(self, primitive: P_DATA) -> tuple[int, Any] | None:
        """The whole message once its last fragment is in (context ID, DIMSE primitive), else None."""
        if self.message is None:
            self.message = DIMSEMessage()
        msg = self.message
        done = msg.decode_msg(primitive, self.assoc)
        if isinstance(msg, C_STORE_RQ) and msg._data_set_file is None:
            cs = msg.command_set
            ts = self.assoc._accepted_cx[cast(int, msg.context_id)].transfer_syntax[0]
            spool = self._conn.open_spool(
                str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID), str(ts)
            )
            pending = cast(BytesIO, msg.data_set).getbuffer()
            spool.write(pending)
            del pending
            msg.data_set = BytesIO()
            msg._data_set_file = cast(Any, spool)
            msg._data_set_path = spool.path
        if not done:
            return None
        if msg._data_set_file is not None:
            cast(_Spool, msg._data_set_file).complete()
        d_primitive = msg.message_to_primitive()
        self.message = None
        return cast(int, msg.context_id), d_primitive


class _Association(Association):
    """An acceptor association using the fast DUL, socket and spooling DIMSE provider."""

    def __init__(self, ae: AE, conn: _Connection) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.conn = conn
        self.dul = _FastDUL(self)
        self.dimse = _SpoolingDIMSE(self)
        # The timers live on the DUL: set them again on the replacement. ARTIM (the request's wait,
        # and the wait for the peer to close) is `pdu_timeout`; the idle timeout is the DUL's own.
        self.acse_timeout = ae.acse_timeout
        self.network_timeout = None

    def _bind_defaults(self) -> None:
        """Only the intervention defaults: pynetdicom's standard handlers log every PDU at debug level,
        formatting it whether or not debug is on."""
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))


# --- one connection ------------------------------------------------------------------------------


class _Callbacks(Protocol):
    """What a receiver calls: the handlers, and `closed` for the SCP's count of associations."""

    def allow(self, peer: Peer) -> bool: ...
    def store(self, instance: ReceivedInstance) -> int: ...
    def released(self, peer: Peer) -> None: ...
    def established(self, conn_id: int) -> None: ...
    def closed(self, conn_id: int) -> None: ...


@dataclass(frozen=True)
class _ReceiverConfig:
    """Everything a receiving process needs; plain data so it can be handed to a worker."""

    ae_title: str
    incoming_dir: Path
    max_pdu: int
    require_called_ae_title: bool
    pdu_timeout: float  # docs/design.md, "Hostile peers: the PDU transport"
    idle_timeout: float
    dimse_timeout: float
    file_mode: int
    tls: TlsFiles | None = None
    limits: DatasetLimits = DEFAULT_LIMITS


class _Connection:
    """State of one accepted TCP connection and the association on it."""

    def __init__(
        self,
        receiver: _Receiver,
        sock: socket.socket,
        address: tuple[str, int],
        conn_id: int,
        refusal: str | None,
    ) -> None:
        self.receiver = receiver
        self.sock = sock
        self.address = address
        self.conn_id = conn_id
        self.refusal = refusal  # the limit its A-ASSOCIATE-RQ is rejected for (local limit exceeded)
        self.peer: Peer | None = None
        self.established = False
        self.dropped = False  # by `drop`
        self.assoc: _Association | None = None

    def open_spool(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> _Spool:
        """Take an incoming file for a C-STORE-RQ and write its preamble and file meta."""
        header = file_meta_header(
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax,
            self.peer.ae_title if self.peer is not None else "",
        )
        return _Spool(self.receiver.incoming, header, self.receiver.config.limits.max_dataset_bytes)

    def describe(self) -> str:
        """Who this connection is, for log lines: address, port and calling AE title once known."""
        ae = f"calling AE {self.peer.ae_title}" if self.peer is not None else "no A-ASSOCIATE-RQ yet"
        return f"connection {self.conn_id} from {self.address[0]}:{self.address[1]} ({ae})"

    def drop(self) -> None:
        """End a connection still negotiating (its reads see the close); an association is kept."""
        if not self.established:
            self.dropped = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Run the association to its end, then tidy up whatever it left."""
        cfg = self.receiver.config
        try:
            sock = self.sock
            tls = self.receiver.ssl_context
            if tls is not None:
                sock.settimeout(cfg.pdu_timeout)  # the whole handshake (CPython's deadline)
                sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                self.sock = sock  # before the handshake, so that `drop` can end it
                sock.do_handshake()
            assoc = _Association(self.receiver.ae, self)
            self.assoc = assoc
            assoc.name = f"radgate-assoc-{self.conn_id}"
            assoc.set_socket(_FastSocket(assoc, sock, cfg.pdu_timeout))
            assoc.acceptor.maximum_length = cfg.max_pdu
            assoc.acceptor.ae_title = cfg.ae_title
            assoc.acceptor.address_info = AddressInformation.from_tuple(sock.getsockname())
            assoc.acceptor.implementation_class_uid = self.receiver.ae.implementation_class_uid
            assoc.acceptor.implementation_version_name = self.receiver.ae.implementation_version_name
            assoc.acceptor.supported_contexts = self.receiver.contexts  # read-only; see _on_requested
            assoc.requestor.address_info = AddressInformation.from_tuple(self.address)
            assoc.bind(evt.EVT_REQUESTED, self._on_requested)
            assoc.bind(evt.EVT_ACCEPTED, self._on_accepted)
            assoc.bind(evt.EVT_C_STORE, self._on_c_store)
            assoc.start()
            assoc.join()
        except TimeoutError:
            LOGGER.warning(
                "%s: no TLS handshake within %g s (dicom.pdu_timeout_s); closing",
                self.describe(),
                cfg.pdu_timeout,
            )
        except (OSError, ssl.SSLError) as exc:
            if not self.dropped:  # else the acceptor said why
                LOGGER.warning(
                    "connection %d from %s closed before an association: %s",
                    self.conn_id,
                    self.address[0],
                    exc,
                )
        except Exception:
            LOGGER.exception("connection %d from %s failed", self.conn_id, self.address[0])
        finally:
            self._finish()

    def _finish(self) -> None:
        assoc = self.assoc
        if assoc is not None:
            cast(_SpoolingDIMSE, assoc.dimse).discard_partial()  # aborted mid-dataset: the partial file goes
            dul = cast(_FastDUL, assoc.dul)
            if dul.is_alive():
                dul.kill_dul()
                dul.join(timeout=5)
            dul.close_wake_pipe()
        with contextlib.suppress(OSError):
            self.sock.close()
        callbacks = self.receiver.callbacks
        if self.established and self.peer is not None:
            try:
                callbacks.released(replace(self.peer, released=assoc is not None and assoc.is_released))
            except Exception:
                LOGGER.exception("release handler failed for association %s", self.peer.association_id)
        callbacks.closed(self.conn_id)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        request = cast(A_ASSOCIATE, rq.primitive)
        assoc.acceptor.supported_contexts = _preferring_requested(
            self.receiver.contexts, request.presentation_context_definition_list, self.receiver.built_contexts
        )
        self.peer = Peer(
            ae_title=str(request.calling_ae_title).strip(),
            address=str(rq.address),
            port=int(rq.port),
            association_id=f"{self.receiver.tag}-{self.conn_id}",
        )
        if self.refusal is not None:
            LOGGER.warning(
                "rejecting association %s from %s (%s): %s reached",
                self.peer.association_id,
                self.peer.ae_title,
                self.peer.address,
                self.refusal,
            )
            self._reject(assoc, (0x02, 0x03, 0x02))
            return
        cfg = self.receiver.config
        called = str(request.called_ae_title).strip()
        if cfg.require_called_ae_title and called != cfg.ae_title:
            LOGGER.warning(
                "rejecting association %s from %s (%s): called AE title %r, this node is %r",
                *(self.peer.association_id, self.peer.ae_title, self.peer.address, called, cfg.ae_title),
            )
            self._reject(assoc, (0x01, 0x01, 0x07))
            return
        try:
            allowed = self.receiver.callbacks.allow(self.peer)
        except Exception:
            LOGGER.exception("peer filter failed; rejecting %s", self.peer.association_id)
            allowed = False
        if not allowed:
            LOGGER.warning(
                "rejecting association %s from %s (%s): peer filter",
                self.peer.association_id,
                self.peer.ae_title,
                self.peer.address,
            )
            self._reject(assoc, (0x01, 0x01, 0x03))

    @staticmethod
    def _reject(assoc: Association, rsd: tuple[int, int, int]) -> None:
        assoc.acse.send_reject(*rsd)
        assoc.kill()  # waits for the peer to close after the A-ASSOCIATE-RJ, as pynetdicom does

    def _on_accepted(self, event: evt.Event) -> None:
        self.established = True
        self.receiver.callbacks.established(self.conn_id)

    def _on_c_store(self, event: evt.Event) -> int:
        """pynetdicom's path (a command split over fragments): the same checks and handler."""
        req = cast(C_STORE, event.request)
        spool = cast(_Spool | None, req._dataset_file)
        req._dataset_file = None  # the file is ours (or the handler's) now: pynetdicom must not unlink it
        if spool is None:  # C-STORE without a dataset
            return STATUS_CANNOT_UNDERSTAND
        ts = str(event.context.transfer_syntax)
        return self.store(
            spool, ts, str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or "")
        )

    def store(self, spool: _Spool, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str) -> int:
        """Check a received dataset and hand it to the handler; the status to answer with."""
        peer = cast(Peer, self.peer)
        if spool.error is not None:
            LOGGER.error(
                "cannot write received sop_instance=%s from %s (association %s), status 0x%04X: %s",
                sop_instance_uid,
                peer.ae_title,
                peer.association_id,
                STATUS_OUT_OF_RESOURCES,
                spool.error,
            )
            spool.discard()
            return STATUS_OUT_OF_RESOURCES
        try:
            if spool.refused is not None:
                raise spool.refused
            ident = inspect_dataset(
                spool.path,
                spool.dataset_offset,
                transfer_syntax,
                spool.head,
                spool.size,
                self.receiver.config.limits,
            )
            sop_class = _same_uid(ident.sop_class_uid, sop_class_uid, "SOPClassUID")
            sop_instance = _same_uid(ident.sop_instance_uid, sop_instance_uid, "SOPInstanceUID")
        except InstanceRefused as exc:
            LOGGER.warning(
                "refused C-STORE sop_instance=%s from %s (%s, association %s), status 0x%04X: %s",
                sop_instance_uid,
                peer.ae_title,
                peer.address,
                peer.association_id,
                exc.status,
                exc.reason,
            )
            spool.discard()
            return exc.status
        except OSError as exc:
            LOGGER.error("cannot read back received sop_instance=%s: %s", sop_instance_uid, exc)
            spool.discard()
            return STATUS_OUT_OF_RESOURCES
        instance = ReceivedInstance(
            path=spool.path,
            study_uid=ident.study_uid,
            series_uid=ident.series_uid,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax=transfer_syntax,
            peer=peer,
            size=spool.size,
            durable_name=True,
        )
        return self.receiver.callbacks.store(instance)


_ContextKey = tuple[str, tuple[str, ...]]  # abstract syntax, transfer syntaxes in our preferred order
_CONTEXT_CACHE_LIMIT = 4096


def _preferring_requested(
    supported: list[PresentationContext],
    requested: list[PresentationContext],
    built: dict[_ContextKey, PresentationContext],
) -> list[PresentationContext]:
    """Our contexts, with transfer syntaxes reordered so negotiation picks the sender's first choice.

    pynetdicom picks by the acceptor's order; a sender lists the syntax its data is in first, and
    taking it spares a transcode (DCMTK cannot even transcode JPEG 2000). A syntax's rank is its
    best position in any requested context of that SOP class; ties keep our order. Only requested
    SOP classes get reordered contexts, and each is built once per process and kept in `built`
    (negotiation only reads them): pynetdicom validates every UID of a new context, which cost
    ~9 ms per association for the 120-odd SOP classes that DCMTK's storescu proposes by default.
    """
    rank: dict[str, dict[str, int]] = {}
    for cx in requested:
        ranks = rank.setdefault(str(cx.abstract_syntax), {})
        for pos, ts in enumerate(cx.transfer_syntax):
            ranks[str(ts)] = min(pos, ranks.get(str(ts), pos))
    result = []
    for cx in supported:
        wanted = rank.get(str(cx.abstract_syntax))
        if wanted:
            ours = [str(ts) for ts in cx.transfer_syntax]
            preferred = sorted(ours, key=lambda ts: (wanted.get(ts, len(ours)), ours.index(ts)))
            key = (str(cx.abstract_syntax), tuple(preferred))
            known = built.get(key)
            if known is None:
                known = build_context(key[0], preferred)
                if len(built) < _CONTEXT_CACHE_LIMIT:
                    built[key] = known
            cx = known
        result.append(cx)
    return result


def _same_uid(in_dataset: str, requested: str, name: str) -> str:
    """The request's UID, refused with 0xA900 when the dataset holds a different one."""
    requested = requested.strip()
    if in_dataset and in_dataset != requested:
        raise InstanceRefused(STATUS_DATASET_MISMATCH, f"{name} differs from the C-STORE request")
    return requested


class _Receiver:
    """Runs associations on accepted sockets: in the SCP's own process or in a worker process."""

    def __init__(
        self, config: _ReceiverConfig, callbacks: _Callbacks, ssl_context: ssl.SSLContext | None, tag: str
    ) -> None:
        self.config = config
        self.callbacks = callbacks
        self.ssl_context = ssl_context
        self.tag = tag  # makes incoming names and association ids unique across processes
        self.incoming = _IncomingFiles(config.incoming_dir, tag, config.file_mode)
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        # the listener's caps (`refusal`) are the ones, with their log line: pynetdicom's own (10 by
        # default) refused associations past it without a word
        self.ae.maximum_associations = 2**31 - 1
        self.ae.acse_timeout = config.pdu_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.contexts: list[PresentationContext] = [build_context(Verification)] + [
            build_context(cast(str, cx.abstract_syntax), list(TRANSFER_SYNTAXES))
            for cx in AllStoragePresentationContexts
        ]
        self.built_contexts: dict[_ContextKey, PresentationContext] = {}  # see _preferring_requested
        self._lock = threading.Lock()
        self._active: dict[int, tuple[_Connection, threading.Thread]] = {}

    def handle(
        self, sock: socket.socket, address: tuple[str, int], conn_id: int, refusal: str | None
    ) -> None:
        """Serve one accepted connection on its own thread."""
        conn = _Connection(self, sock, address, conn_id, refusal)
        thread = threading.Thread(target=self._run, args=(conn,), name=f"radgate-conn-{conn_id}", daemon=True)
        with self._lock:
            self._active[conn_id] = (conn, thread)
        thread.start()

    def _run(self, conn: _Connection) -> None:
        try:
            conn.serve()
        finally:
            with self._lock:
                self._active.pop(conn.conn_id, None)

    def drop(self, conn_id: int) -> None:
        """End a connection if it is still negotiating (`_Connection.drop`)."""
        with self._lock:
            running = self._active.get(conn_id)
        if running is not None:
            running[0].drop()

    def close(self, timeout: float) -> None:
        """Abort every association, wait (bounded) for their threads, remove the unused incoming files."""
        with self._lock:
            running = list(self._active.values())
        for conn, _ in running:
            if conn.assoc is not None and conn.assoc.is_alive():
                with contextlib.suppress(Exception):
                    conn.assoc.abort()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for _, thread in running:
            thread.join(timeout=timeout)
        self.incoming.close()


# --- the handlers, and worker processes ----------------------------------------------------------


@dataclass(frozen=True)
class _Handlers:
    """The SCP's handlers with the guards every caller needs; plain data, so a worker gets a copy."""

    handler: InstanceHandler
    on_release: ReleaseHandler | None
    peer_filter: PeerFilter | None
    prepare: Callable[[], None] | None = None

    def prepare_process(self) -> None:
        """Run `prepare` where the handlers will run; a failure is logged, and the first instance
        then pays for the set-up, as it would without `prepare`."""
        if self.prepare is None:
            return
        try:
            self.prepare()
        except Exception:
            LOGGER.exception("preparing the instance handler failed; it will set up on its first instance")

    def allow(self, peer: Peer) -> bool:
        """Peer filter; no filter accepts everyone."""
        return self.peer_filter is None or bool(self.peer_filter(peer))

    def store(self, instance: ReceivedInstance) -> int:
        """Run the instance handler; an exception answers 0xA700 and removes the left-over file."""
        try:
            return int(self.handler(instance))
        except Exception:
            LOGGER.exception(
                "instance handler failed for sop_instance=%s (association %s)",
                instance.sop_instance_uid,
                instance.peer.association_id,
            )
            with contextlib.suppress(OSError):
                instance.path.unlink()
            return STATUS_OUT_OF_RESOURCES

    def released(self, peer: Peer) -> None:
        if self.on_release is not None:
            self.on_release(peer)


class _WorkerCallbacks:
    """A receiving process's callbacks: its own copy of the handlers; `closed` goes to the parent."""

    def __init__(self, handlers: _Handlers, notify: _Notifier) -> None:
        self.handlers = handlers
        self.notify = notify
        self.allow = handlers.allow
        self.store = handlers.store
        self.released = handlers.released

    def established(self, conn_id: int) -> None:
        self.notify("established", conn_id)

    def closed(self, conn_id: int) -> None:
        self.notify("closed", conn_id)


class _Notifier:
    """A worker's one-way messages to the parent (ready, established, closed, log records), from any
    thread."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def __call__(self, kind: str, payload: Any) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._conn.send((kind, payload))


class _ForwardLogs(logging.Handler):
    """Sends a worker's log records to the parent, which logs them under the same logger name:
    the message, and the traceback as text (``exc_text``) when the record has one."""

    def __init__(self, notify: _Notifier) -> None:
        super().__init__(logging.INFO)
        self._notify = notify
        self._traceback = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            traceback = record.exc_text
            if record.exc_info and not traceback:
                traceback = self._traceback.formatException(record.exc_info)
            self._notify("log", (record.name, record.levelno, record.getMessage(), traceback))


def _worker_main(
    config: _ReceiverConfig, handlers: _Handlers, fd_conn: Connection, notify_conn: Connection, index: int
) -> None:
    """Entry point of a receiving process: take sockets from the parent until told to stop."""
    notify = _Notifier(notify_conn)
    # pynetdicom makes every UID of a proposal into a pydicom UID several times over (~1700 for
    # storescu's default proposal of 128 contexts), and pydicom matches each against its regex
    # (decoding that proposal: 6.6 ms, 4.2 without). That check only warns; this process relies on
    # its own (pynetdicom's at negotiation, `inspect_dataset`, `_same_uid`, the spool's `check_uid`).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(_ForwardLogs(notify))
    ssl_context = config.tls.context() if config.tls is not None else None
    callbacks = _WorkerCallbacks(handlers, notify)
    receiver = _Receiver(config, callbacks, ssl_context, tag=f"w{index}.{os.getpid()}")
    handlers.prepare_process()
    gc.freeze()  # start-up objects live until exit: full collections need not scan them
    notify("ready", None)
    while True:
        try:
            item = fd_conn.recv()
        except (EOFError, OSError):
            break
        if item is None:
            break
        if item[0] == "drop":
            receiver.drop(item[1])
            continue
        _, conn_id, address, refusal = item
        fd = recv_handle(fd_conn)
        receiver.handle(socket.socket(fileno=fd), address, conn_id, refusal)
    receiver.close(timeout=5)


def _log_forwarded(worker: _Worker, name: str, level: int, text: str, traceback: str | None) -> None:
    """Log a record a receiving process forwarded (see `_ForwardLogs`), its traceback included."""
    logger = logging.getLogger(name)
    if logger.isEnabledFor(level):
        record = logger.makeRecord(name, level, __file__, 0, "[pid %s] %s", (worker.process.pid, text), None)
        record.exc_text = traceback  # formatters print it as the record's traceback
        logger.handle(record)


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    fd_conn: Connection
    notify_conn: Connection
    index: int
    active: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Accepted:
    """The acceptor's record of a connection, from `accept` to `closed`."""

    address: str
    slot: bool  # counts against max_associations and max_associations_per_peer
    pending: bool = True  # no association negotiated yet (and not dropped)
    worker: _Worker | None = None


# --- the SCP -------------------------------------------------------------------------------------


class StorageSCP:
    """DICOM Storage SCP (C-ECHO, C-STORE of every storage SOP class) feeding an `InstanceHandler`.

    `start()` serves in background threads and returns once the port is listening; `stop()` ends
    it; `serve_forever()` blocks until `stop()` (from another thread or a signal handler). The
    handlers run on the association's thread, concurrently for concurrent associations, so they must
    be thread-safe. Peers are bounded as docs/design.md ("Hostile peers: the PDU transport") says:
    `max_pdu` and `pdu_timeout` per PDU, `idle_timeout` per association, `max_associations` and
    `max_associations_per_peer` (further requests are rejected), `max_pending` connections not yet
    associated (past it the oldest is dropped). With `workers` > 1, that many processes receive
    (the machine's cores run associations in parallel) and each runs its own copy of the handlers,
    where the instance was received: no hop back to this process before the acknowledgement. The
    handlers must then be picklable and keep no state that this process needs (the node's
    `Receiver` opens its database per process). `prepare`, if given, runs once in each receiving
    process before it takes an association, so that one-time set-up (opening a database, compiling
    statements) is not paid for by the first instance a sender waits on. `limits` bound what
    one dataset may be (`DatasetLimits`): past one, the C-STORE is answered 0xC000 with one log
    line and the association goes on. A received file gets ``file_mode`` once its dataset is whole
    (owner-readable; until then it is write-only, see `received_completely`); ValueError if
    ``file_mode`` is not a permission mode readable by its owner.
    """

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        incoming_dir: Path,
        handler: InstanceHandler,
        on_release: ReleaseHandler | None = None,
        peer_filter: PeerFilter | None = None,
        *,
        max_pdu: int = 262144,
        max_associations: int = 16,
        max_associations_per_peer: int = 8,
        max_pending: int = 8,
        pdu_timeout: float = 30.0,
        idle_timeout: float = 60.0,
        tls: ssl.SSLContext | TlsFiles | None = None,
        require_called_ae_title: bool = False,
        workers: int = 1,
        dimse_timeout: float = 60.0,
        prepare: Callable[[], None] | None = None,
        limits: DatasetLimits = DEFAULT_LIMITS,
        file_mode: int = 0o600,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not file_mode & 0o400 or file_mode & ~0o777:
            raise ValueError(f"file_mode {file_mode:o}: a received file must be readable by its owner")
        if workers > 1 and isinstance(tls, ssl.SSLContext):
            raise ValueError("with workers > 1 give TLS as TlsFiles: an SSLContext cannot cross processes")
        self.host = host
        self.port = port
        self.handlers = _Handlers(handler, on_release, peer_filter, prepare)
        self.max_associations = max_associations
        self.max_associations_per_peer = max_associations_per_peer
        self.max_pending = max_pending
        self.workers = workers
        incoming_dir = Path(incoming_dir)
        incoming_dir.mkdir(parents=True, exist_ok=True)
        self.config = _ReceiverConfig(
            ae_title=ae_title,
            incoming_dir=incoming_dir,
            max_pdu=max_pdu,
            require_called_ae_title=require_called_ae_title,
            pdu_timeout=pdu_timeout,
            idle_timeout=idle_timeout,
            dimse_timeout=dimse_timeout,
            file_mode=file_mode,
            tls=tls if isinstance(tls, TlsFiles) else None,
            limits=limits,
        )
        self._ssl_context = tls.context() if isinstance(tls, TlsFiles) else tls
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepted: dict[int, _Accepted] = {}  # by connection id, in the order accepted
        self._conn_ids = itertools.count(1)
        self._receiver: _Receiver | None = None
        self._workers: list[_Worker] = []

    # -- lifecycle --

    def start(self) -> None:
        """Listen and serve in background threads (and worker processes); returns when ready.

        Incoming files a previous run left in `incoming_dir` are removed first: a handler that needs
        them (`plugin.spool.Spool.recover`) has taken what it needs before.
        """
        stale = list(self.config.incoming_dir.glob(f"{INCOMING_PREFIX}*"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            LOGGER.warning(
                "removed %d unacknowledged partial files from %s", len(stale), self.config.incoming_dir
            )
        listener = socket.create_server((self.host, self.port), backlog=128, reuse_port=False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        if self.workers == 1:
            self._receiver = _Receiver(self.config, self, self._ssl_context, tag=f"p{os.getpid()}")
            self.handlers.prepare_process()
        else:
            self._start_workers()
        self._spawn(self._accept_loop, "radgate-accept")
        LOGGER.info(
            "storage SCP %s listening on %s:%d (%d receiving process%s, max PDU %d%s)",
            self.config.ae_title,
            self.host,
            self.port,
            self.workers,
            "es" if self.workers > 1 else "",
            self.config.max_pdu,
            ", TLS" if self._ssl_context else "",
        )

    def serve_forever(self) -> None:
        """Blocking form for the node's main thread."""
        if self._listener is None:
            self.start()
        self._stopped.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort running associations, end workers; safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stop_w.send(b"\0")
        for t in self._threads:
            if t.name == "radgate-accept":
                t.join(timeout)
        if self._listener is not None:
            self._listener.close()
        if self._receiver is not None:
            self._receiver.close(timeout)
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            with contextlib.suppress(OSError), w.send_lock:
                w.fd_conn.send(None)
        for w in workers:
            w.process.join(timeout)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout)
            w.fd_conn.close()
            w.notify_conn.close()
        for t in self._threads:
            t.join(timeout)
        self._stop_r.close()
        self._stop_w.close()
        self._stopped.set()

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def active_associations(self) -> int:
        """Connections being served now (for health checks)."""
        return len(self._accepted)

    @property
    def receiving_processes(self) -> list[int]:
        """Process ids of the receiving processes now taking associations (empty with `workers` 1)."""
        with self._lock:
            return [cast(int, w.process.pid) for w in self._workers]

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- accepting --

    def _accept_loop(self) -> None:
        listener = cast(socket.socket, self._listener)
        while not self._stopping.is_set():
            ready = select.select([listener, self._stop_r], [], [])[0]
            if self._stop_r in ready:
                return
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                    LOGGER.error("accept failed: %s", exc)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn_id = next(self._conn_ids)
            refusal = self._admit(conn_id, address[0])
            try:
                self._dispatch(sock, (address[0], address[1]), conn_id, refusal)
            except Exception:
                LOGGER.exception("cannot hand over connection %d", conn_id)
                sock.close()
                self.closed(conn_id)

    def _admit(self, conn_id: int, address: str) -> str | None:
        """Record a new connection; drop the oldest one still negotiating when `max_pending` of
        them are; the limit its request is to be rejected for, or None."""
        with self._lock:
            pending = [cid for cid, conn in self._accepted.items() if conn.pending]
            dropped = pending[0] if len(pending) >= self.max_pending else None
            if dropped is not None:
                oldest = self._accepted[dropped]
                oldest.pending = oldest.slot = False
            slots = [conn.address for conn in self._accepted.values() if conn.slot]
            refusal = None
            if len(slots) >= self.max_associations:
                refusal = f"dicom.max_associations ({self.max_associations})"
            elif slots.count(address) >= self.max_associations_per_peer:
                refusal = f"dicom.max_associations_per_peer ({self.max_associations_per_peer})"
            self._accepted[conn_id] = _Accepted(address, slot=refusal is None)
        if dropped is not None:
            LOGGER.warning(
                "dropping connection %d from %s: not associated yet, and dicom.max_pending (%d) "
                "connections are negotiating",
                dropped,
                oldest.address,
                self.max_pending,
            )
            self._drop(dropped, oldest.worker)
        return refusal

    def _drop(self, conn_id: int, worker: _Worker | None) -> None:
        if self._receiver is not None:
            self._receiver.drop(conn_id)
        elif worker is not None:
            with contextlib.suppress(OSError), worker.send_lock:
                worker.fd_conn.send(("drop", conn_id))

    def _dispatch(
        self, sock: socket.socket, address: tuple[str, int], conn_id: int, refusal: str | None
    ) -> None:
        if self._receiver is not None:
            self._receiver.handle(sock, address, conn_id, refusal)
            return
        with self._lock:
            worker = min(self._workers, key=lambda w: w.active)
            worker.active += 1
            accepted = self._accepted.get(conn_id)
            if accepted is not None:
                accepted.worker = worker
        with worker.send_lock:
            worker.fd_conn.send(("serve", conn_id, address, refusal))
            send_handle(worker.fd_conn, sock.fileno(), cast(int, worker.process.pid))
        sock.close()

    # -- callbacks of the in-process receiver (workers call their own copy of the handlers) --

    def allow(self, peer: Peer) -> bool:
        return self.handlers.allow(peer)

    def store(self, instance: ReceivedInstance) -> int:
        return self.handlers.store(instance)

    def released(self, peer: Peer) -> None:
        self.handlers.released(peer)

    def established(self, conn_id: int) -> None:
        with self._lock:
            accepted = self._accepted.get(conn_id)
            if accepted is not None:
                accepted.pending = False

    def closed(self, conn_id: int) -> None:
        with self._lock:
            accepted = self._accepted.pop(conn_id, None)
            if accepted is not None and accepted.worker is not None:
                accepted.worker.active -= 1

    # -- worker processes --

    def _start_workers(self) -> None:
        for index in range(self.workers):
            try:
                worker = self._start_worker(index)
            except Exception:
                self.stop()
                raise
            with self._lock:
                self._workers.append(worker)
        for worker in list(self._workers):
            if not worker.ready.wait(60):
                self.stop()
                raise RuntimeError("a receiving process did not start")

    def _start_worker(self, index: int) -> _Worker:
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        fd_parent, fd_child = ctx.Pipe(duplex=True)
        notify_parent, notify_child = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker_main,
            args=(self.config, self.handlers, fd_child, notify_child, index),
            name=f"radgate-receiver-{index}",
            daemon=True,
        )
        try:
            process.start()
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"with workers > 1 each receiving process runs the handlers, so they must pickle: {exc}"
            ) from exc
        finally:
            fd_child.close()
            notify_child.close()
        worker = _Worker(process, fd_parent, notify_parent, index)
        self._spawn(self._serve_worker, f"radgate-worker-{index}", worker)
        return worker

    def _worker_ended(self, worker: _Worker) -> None:
        """A receiving process is gone: forget its associations and, unless stopping, start another."""
        if self._stopping.is_set():
            return
        worker.process.join(5)
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            lost = [conn_id for conn_id, conn in self._accepted.items() if conn.worker is worker]
        for conn_id in lost:
            self.closed(conn_id)
        LOGGER.error(
            "receiving process %d (pid %s) ended, exit code %s (%d association(s) lost); starting another",
            *(worker.index, worker.process.pid, worker.process.exitcode, len(lost)),
        )
        worker.fd_conn.close()
        worker.notify_conn.close()
        try:
            replacement = self._start_worker(worker.index)
        except Exception:
            LOGGER.exception("cannot start a receiving process in place of pid %s", worker.process.pid)
            return
        if not replacement.ready.wait(60):
            LOGGER.error("the receiving process started in place of pid %s is not ready", worker.process.pid)
            return
        with self._lock:
            if not self._stopping.is_set():
                self._workers.append(replacement)

    def _serve_worker(self, worker: _Worker) -> None:
        """Take one worker's notifications (ready, closed connections, log records) until it ends."""
        while True:
            try:
                kind, payload = worker.notify_conn.recv()
            except (EOFError, OSError):
                self._worker_ended(worker)
                return
            if kind == "closed":
                self.closed(payload)
            elif kind == "established":
                self.established(payload)
            elif kind == "log":
                _log_forwarded(worker, *payload)
            elif kind == "ready":
                worker.ready.set()
