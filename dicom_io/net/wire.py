"""Bytes of the protocol built and checked by hand: the file meta header and the C-STORE command
sets written or read per instance, the PDU types, A-ABORT reasons, and the structure of an
A-ASSOCIATE-RQ and of a P-DATA-TF's PDV items. No pynetdicom objects; pure functions."""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_io.net.inspection import _text

# --- encoding the two small things written per instance ------------------------------------------
# Fixed layouts, built by hand instead of by pydicom's writer (checked byte-equal to it in the tests).


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


_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_ABORT_NOT_SPECIFIED, _ABORT_UNRECOGNIZED_PDU, _ABORT_UNEXPECTED_PDU = 0x00, 0x01, 0x02
_ABORT_INVALID_PARAMETER = 0x06  # A-ABORT reasons of the service provider (PS3.8 9.3.8)

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
