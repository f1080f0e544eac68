"""Hostile values in log lines: a real node (`radgate serve`), real receiving processes, the formatters.

Peers choose AE titles, UIDs and dataset strings, and these reach log messages at many call sites;
none of them may start a line of the node's log. A receiving process's errors reach the parent's
log with their tracebacks.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom.config
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from support.node import ECHOSCU, NodeProcess, ct_instance, wait_for, write_series

from dicom_io.net import ReceivedInstance, StorageSCP
from plugin.logs import PLAIN_FORMAT, TRACEBACK_INDENT, SafeFormatter, _JsonLines
from plugin.orthanc.entry import OrthancLogHandler

# the start of a line of `radgate serve`'s plain log format (plugin.logs.PLAIN_FORMAT)
LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+\[\d+\]: "
)


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: bytes, called: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, its AE title fields as given (padded to 16 bytes):
    pynetdicom refuses to send titles with control characters."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2")
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4")
    body = b"".join(
        [
            struct.pack(">HH", 1, 0),
            called.ljust(16)[:16],
            calling.ljust(16)[:16],
            bytes(32),
            _item(0x10, b"1.2.840.10008.3.1.1.1"),
            _item(0x20, context),
            _item(0x50, user),
        ]
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def raw_associate(port: int, calling: bytes, called: bytes) -> bytes:
    """Send an A-ASSOCIATE-RQ; the answer's first 10 bytes (PDU type 2: AC, 3: RJ, 7: A-ABORT)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(associate_rq(calling, called))
        answer = b""
        while len(answer) < 10:  # bounded: each recv returns at least one byte or the end
            chunk = s.recv(10 - len(answer))
            if not chunk:
                break
            answer += chunk
    return answer


def store_with_newline_in_sop_uid(port: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """C-STORE one CT instance whose SOP Instance UID holds a newline; that UID."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda _value: (True, ""))  # pynetdicom's, as a sender
    ds = ct_instance(generate_uid(), generate_uid(), 1)
    sop_uid = f"1.2.826.0.1.{generate_uid()[-20:]}\nFORGED"  # well within the 64 characters
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADGATE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0xC000
    finally:
        assoc.release()
    return sop_uid


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the module's tests: the called AE title checked, one receiving process, and caps
    above the dozen associations one test holds at once (the tests here do not see each other's)."""
    caps = {"max_associations": 16, "max_associations_per_peer": 16, "max_pending": 16}  # 12 connect at once
    settings = {"dicom": {"require_called_ae_title": True, "receivers": 1, **caps}}
    n = NodeProcess(tmp_path_factory.mktemp("hostile-logs"), settings).start()
    yield n
    assert n.stop() == 0, n.log()


def test_peer_values_forge_no_line_in_the_node_log(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A calling AE title and a UID with line breaks: each shows escaped on its own line."""
    answer = raw_associate(node.port, b"EV\nFORGED\r", b"RADGATE")
    assert answer[:1] in (b"\x03", b"\x07"), answer  # refused, one way or the other
    sop_uid = store_with_newline_in_sop_uid(node.port, monkeypatch)
    escaped_uid = sop_uid.replace("\n", "\\n")

    def both_refusals() -> str | None:
        text = node.log()
        return text if "EV\\nFORGED" in text and escaped_uid in text else None

    log = wait_for(both_refusals, 30, "both refusals in the log")
    strays = [line for line in log.splitlines() if not LOG_LINE.match(line)]
    assert [line for line in strays if not line.startswith(TRACEBACK_INDENT)] == []
    files = write_series(tmp_path / "src", 1)
    assert node.storescu(*files).returncode == 0  # still serving


def test_a_wrong_called_ae_title_is_refused_with_one_log_line(node: NodeProcess) -> None:
    logged = len(node.log())  # the module's node: its log so far is other tests'
    answer = raw_associate(node.port, b"PEER", b"SOMEONE")
    assert answer[:1] == b"\x03" and answer[7:10] == b"\x01\x01\x07", answer  # called AE not recognised

    def refusals() -> list[str]:
        return [line for line in node.log()[logged:].splitlines() if "rejecting association" in line]

    [line] = wait_for(refusals, 30, "the refusal's log line")
    assert "from PEER (127.0.0.1)" in line and "called AE title 'SOMEONE', this node is 'RADGATE'" in line
    assert raw_associate(node.port, b"PEER", b"RADGATE")[:1] == b"\x02"  # the right one is accepted


def test_a_dozen_concurrent_associations_into_one_receiving_process(node: NodeProcess) -> None:
    """The node's cap (`max_associations`, with its log line) is the one: pynetdicom's own (10 by
    default, counted its own way) refused some of these without a word. The module's node has one
    receiving process and caps of 16."""
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(12)]
    try:
        answers = []
        for s in held:
            s.sendall(associate_rq(b"PEER", b"RADGATE"))
            answers.append(s.recv(1))
        assert answers == [b"\x02"] * 12
    finally:
        for s in held:
            s.close()
    echo = subprocess.run(  # the node checks the called AE title: echoscu names it
        [ECHOSCU, "-aec", "RADGATE", "127.0.0.1", str(node.port)], capture_output=True, timeout=60
    )
    assert echo.returncode == 0


def _explode(instance: ReceivedInstance) -> int:
    raise RuntimeError("handler exploded")


def test_a_receiving_process_forwards_the_traceback_of_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="dicom_io.net")
    scp = StorageSCP("RADGATE", "127.0.0.1", 0, tmp_path / "incoming", _explode, workers=2)
    scp.start()
    try:
        [path] = write_series(tmp_path / "src", 1)
        sent = subprocess.run(
            ["/usr/bin/storescu", "127.0.0.1", str(scp.port), str(path)], capture_output=True, timeout=60
        )
        assert sent.returncode != 0 or b"0xa700" in sent.stderr.lower()

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "instance handler failed" in r.getMessage()]

        [record] = wait_for(failures, 30, "the forwarded error")
    finally:
        scp.stop()
    assert record.exc_text is not None
    assert "Traceback" in record.exc_text and "in _explode" in record.exc_text
    assert record.exc_text.rstrip().endswith("RuntimeError: handler exploded")
    lines = SafeFormatter(PLAIN_FORMAT).format(record).splitlines()
    assert len(lines) > 2 and all(line.startswith(TRACEBACK_INDENT) for line in lines[1:])


def _record(message: str, *args: object, exc_text: str | None = None) -> logging.LogRecord:
    record = logging.LogRecord("dicom_io.net", logging.ERROR, __file__, 1, message, args, None)
    record.exc_text = exc_text
    return record


HOSTILE = "A\nB\rC\x00D\x1bE\x7fF\x85G\u2028H\u2029I\tJ"


def test_the_plain_format_escapes_every_line_break_and_control_character() -> None:
    [line] = SafeFormatter(PLAIN_FORMAT).format(_record("calling AE %s", HOSTILE)).splitlines()
    assert line.endswith("calling AE A\\nB\\rC\\x00D\\x1bE\\x7fF\\x85G\\u2028H\\u2029I\\tJ")


def test_a_traceback_is_an_indented_block_even_when_its_message_holds_line_breaks() -> None:
    try:
        raise ValueError(f"bad UID {HOSTILE}")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    text = SafeFormatter(PLAIN_FORMAT).format(record)
    assert len(text.splitlines()) > 5  # a block: the traceback's lines and those of its message
    assert all(line.startswith(TRACEBACK_INDENT) for line in text.splitlines()[1:])
    assert all(LOG_LINE.match(line) is None for line in text.splitlines()[1:])


def test_json_lines_stay_one_valid_object_per_line() -> None:
    text = _JsonLines().format(_record("calling AE %s", HOSTILE, exc_text="Traceback\n  x\nValueError: y"))
    [line] = text.splitlines()
    entry = json.loads(line)
    assert entry["message"] == f"calling AE {HOSTILE}"
    assert entry["exception"] == "Traceback\n  x\nValueError: y"


class _OrthancLog:
    """What Orthanc's plugin SDK offers a plugin for logging: one call per message."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def LogError(self, text: str) -> None:  # the SDK's names
        self.messages.append(text)

    LogWarning = LogInfo = LogError


def test_the_orthanc_plugin_logs_one_escaped_line_per_message() -> None:
    orthanc = _OrthancLog()
    handler = OrthancLogHandler(orthanc)  # type: ignore[arg-type]
    handler.handle(_record("REST POST /radgate/studies/%s/run failed", HOSTILE))
    [text] = orthanc.messages
    assert "\n" not in text and text.endswith(
        "studies/A\\nB\\rC\\x00D\\x1bE\\x7fF\\x85G\\u2028H\\u2029I\\tJ/run failed"
    )
