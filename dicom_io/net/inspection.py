"""Checking a received dataset without decoding it: a walk over its element headers.

`inspect_dataset` (a dataset at an offset of a file) returns its identifying UIDs
(`DatasetIdentity`), `inspect_part10` (a whole Part 10 file) those and its transfer syntax
(`Part10Identity`); both raise `InstanceRefused` with the status to answer. `DatasetLimits` bound
what one dataset may be."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from pydicom.datadict import DicomDictionary
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_io.net.interface import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, RefusalReason


class InstanceRefused(Exception):
    """A received dataset the SCP answers with a failure status instead of handing it on: the
    status, the reason in words (logged) and as a `RefusalReason` code (``code``; by default
    DATASET_MISMATCH for 0xA900, MALFORMED otherwise)."""

    def __init__(self, status: int, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        if code is None:
            code = (
                RefusalReason.DATASET_MISMATCH
                if status == STATUS_DATASET_MISMATCH
                else RefusalReason.MALFORMED
            )
        self.code = code


@dataclass(frozen=True)
class DatasetIdentity:
    """The attributes the transport reads from each dataset."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Part10Identity(DatasetIdentity):
    """A Part 10 file's identity: the SOP Class and Instance UIDs are never empty (the dataset's,
    else the file meta's Media Storage ones), and `transfer_syntax` is the file meta's."""

    transfer_syntax: str


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
_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX = 0x0002, 0x0003, 0x0010  # file meta elements
_META_UIDS = frozenset({_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX})
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_META_READ = 1 << 16  # a file meta group is a few hundred bytes
_IS_RE = re.compile(r"[+-]?[0-9]+")


MAX_DEPTH_CEILING = 64  # keeps pydicom, a recursive reader, far from its RecursionError (docs/design.md)


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
                RefusalReason.SEQUENCE_TOO_DEEP,
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
                RefusalReason.INFLATED_TOO_LARGE,
            )
        out.write(chunk)
    if total == 0:
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "empty dataset")
    out.flush()


def inspect_part10(path: Path, limits: DatasetLimits = DEFAULT_LIMITS) -> Part10Identity:
    """`inspect_dataset` for a whole DICOM Part 10 file, whose file meta says where and how it is encoded.

    Raises `InstanceRefused` (0xC000) also when the file has no DICM prefix, its file meta no valid
    transfer syntax UID, or neither its dataset nor its file meta a valid SOP Class or Instance UID;
    OSError when it cannot be read.
    """
    with path.open("rb") as f:
        head = f.read(_META_READ)
    if head[128:132] != b"DICM":
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    meta: dict[int, str] = {}
    while pos + 8 <= len(head) and head[pos : pos + 2] == b"\x02\x00":  # group 0002, Explicit VR LE
        (element,) = struct.unpack_from("<H", head, pos + 2)
        if bytes(head[pos + 4 : pos + 6]) in _LONG_VRS:
            (length,) = struct.unpack_from("<L", head, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            pos += 8
        if element in _META_UIDS:
            meta[element] = _text(head[pos : pos + length])
        pos += length
    transfer_syntax = meta.get(_TRANSFER_SYNTAX, "")
    if not transfer_syntax or pos > len(head):
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "file meta without a transfer syntax")
    if len(transfer_syntax) > 64 or not _UID_RE.fullmatch(transfer_syntax):
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "malformed TransferSyntaxUID")
    found = inspect_dataset(path, pos, transfer_syntax, limits=limits)
    sop_instance = found.sop_instance_uid or meta.get(_MEDIA_SOP_INSTANCE, "")
    sop_class = found.sop_class_uid or meta.get(_MEDIA_SOP_CLASS, "")
    for name, uid in (("SOPInstanceUID", sop_instance), ("SOPClassUID", sop_class)):
        if not uid:
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"missing {name}")
        if len(uid) > 64 or not _UID_RE.fullmatch(uid):
            raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, f"malformed {name}")
    return Part10Identity(found.study_uid, found.series_uid, sop_instance, sop_class, transfer_syntax)


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
