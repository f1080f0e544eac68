"""DICOM C-STORE: one association per batch, the files' own transfer syntaxes."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from plugin.config import (
    ClientTLS,
    DicomDestination,
)
from plugin.dispatch.base import (
    UNCOMPRESSED,
    Outcomes,
    Outgoing,
    describe_network_error,
    fail_all,
    missing_file,
)


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext:
    """The TLS context towards a DICOM peer (a destination, a source): its CA, our certificate."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def _association_failure(
    assoc: Any, host: str, port: int, tls: ssl.SSLContext | None, timeout_s: float, where: str
) -> str:
    """Why ``assoc`` (to a destination or a source) was not established, in words: rejected, or
    the connection's own error (refused, timed out, TLS), found by connecting once more."""
    if assoc.is_rejected:
        return f"association rejected by {where} (A-ASSOCIATE-RJ; check the AE titles)"
    try:  # pynetdicom only logs why the connection failed (and calls it an abort): try once more
        with socket.create_connection((host, port), timeout_s) as sock:
            if tls is not None:
                tls.wrap_socket(sock, server_hostname=host).close()
    except OSError as err:  # ssl.SSLError is an OSError
        return describe_network_error(err, where)
    if assoc.is_aborted:
        return f"association aborted by {where}"
    return f"no association with {where} (no A-ASSOCIATE response)"


def associate(
    host: str,
    port: int,
    called_ae_title: str,
    calling_ae_title: str,
    contexts: list[PresentationContext],
    timeout_s: float,
    tls: ClientTLS | None,
    roles: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> tuple[Any, str | None]:
    """An association with a DICOM peer (a destination, a source) proposing ``contexts`` (and SCP/SCU
    ``roles``, with event ``handlers``), ``timeout_s`` for every wait: (association, None), or
    (None, why there is none in words). Never raises for a network or peer failure."""
    where = f"{called_ae_title}@{host}:{port}"
    ae = AE(ae_title=calling_ae_title)
    ae.requested_contexts = contexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    context = client_ssl_context(tls) if tls is not None else None
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called_ae_title,
            ext_neg=roles,
            evt_handlers=handlers,
            tls_args=(context, host) if context is not None else None,
        )
    except (OSError, ssl.SSLError) as err:
        return None, describe_network_error(err, where)
    if not assoc.is_established:
        return None, _association_failure(assoc, host, port, context, timeout_s, where)
    return assoc, None


def _status_reason(status: Any) -> str | None:
    """None for Success and Warning (0xB000.. : stored, perhaps coerced), else the status in words."""
    if "Status" not in status:
        return "no C-STORE response (timeout, abort or invalid response)"
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return None
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    return f"C-STORE status 0x{code:04X} ({category}){comment}"


class DicomSender:
    """C-STORE SCU: one association per batch; proposes each file's own transfer syntax and the
    uncompressed little endian ones, so an uncompressed file can be converted for a picky peer."""

    def __init__(self, destination: DicomDestination, calling_ae_title: str, timeout_s: float) -> None:
        self.destination = destination
        self.calling_ae_title = destination.calling_ae_title or calling_ae_title
        self.timeout_s = timeout_s
        self.where = f"{destination.ae_title}@{destination.host}:{destination.port}"

    def _contexts(self, items: Sequence[Outgoing]) -> tuple[list[PresentationContext], Outcomes]:
        """Presentation contexts for the files' SOP classes and syntaxes; unreadable files fail here.

        At most two per file, so a batch of 64 stays within the 128 contexts DICOM allows.
        """
        wanted: dict[tuple[str, tuple[str, ...]], None] = {}
        failed: Outcomes = {}
        for item in items:
            if (reason := missing_file(item)) is not None:
                failed[item.delivery_id] = reason
                continue
            try:
                meta = read_file_meta_info(item.path)
                sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            except (InvalidDicomError, AttributeError, OSError) as err:
                failed[item.delivery_id] = f"not a readable DICOM file: {item.path} ({err})"
                continue
            if syntax not in UNCOMPRESSED:
                wanted[(sop_class, (syntax,))] = None
            wanted[(sop_class, UNCOMPRESSED)] = None
        contexts = [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in wanted]
        return contexts, failed

    def _associate(self, contexts: list[PresentationContext]) -> tuple[Any, str | None]:
        """An association proposing ``contexts``; (association, None) or (None, why there is none)."""
        d = self.destination
        return associate(d.host, d.port, d.ae_title, self.calling_ae_title, contexts, self.timeout_s, d.tls)

    def check(self) -> str | None:
        """C-ECHO over a new association: None when the peer answers Success, else why not."""
        assoc, failure = self._associate([build_context(Verification)])
        if assoc is None:
            return failure
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if "Status" not in status:
            return f"no C-ECHO response from {self.where} (timeout, abort or invalid response)"
        code = int(status.Status)
        return None if code == 0 else f"C-ECHO status 0x{code:04X} from {self.where}"

    def send(self, items: Sequence[Outgoing]) -> Outcomes:
        contexts, outcomes = self._contexts(items)
        todo = [item for item in items if item.delivery_id not in outcomes]
        if not todo:
            return outcomes
        assoc, failure = self._associate(contexts)
        if assoc is None:
            return outcomes | fail_all(todo, failure or "no association")
        try:
            for item in todo:
                if not assoc.is_established:
                    outcomes[item.delivery_id] = f"association with {self.where} ended during the batch"
                    continue
                try:
                    status = assoc.send_c_store(dcmread(item.path))
                except (ValueError, AttributeError, InvalidDicomError, OSError) as err:
                    # ValueError: no accepted presentation context for this SOP class / syntax
                    outcomes[item.delivery_id] = f"not sent to {self.where}: {err}"
                    continue
                outcomes[item.delivery_id] = _status_reason(status)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes
