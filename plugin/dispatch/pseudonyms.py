"""Pseudonyms kept in the job store, so a de-identified re-send maps a patient and a UID the same way.

An original value is stored only as HMAC-SHA256 under the node's secret (``deidentify.key`` in the
data dir, 32 random bytes, mode 0600, made at first use); the replacement is random (a 2.25 UUID
UID, or ``RG`` and 14 hex digits for a patient), so neither the table nor the exported files lead
back to the original without both the secret and the original value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plugin.store.engine import Store
from plugin.store.models import Pseudonym, utcnow

KEY_FILE = "deidentify.key"


def load_key(data_dir: Path) -> bytes:
    """The node's pseudonym secret; created (0600, exclusively) when it is not there yet.

    Raises OSError when the file cannot be read or made, and ValueError when it is not 32 bytes.
    """
    path = data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
    else:
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
    if len(key) != 32:
        raise ValueError(f"{path} is not a 32-byte key; restore it from backup (pseudonyms depend on it)")
    return key


class StorePseudonyms:
    """A `dicom_io.deidentify.Pseudonymizer` on the ``pseudonyms`` table of ``store``.

    Each value not seen before by this object is one short transaction (SQLite's write lock is
    never held while files are read or written): the stored replacement, or a new one inserted. A
    concurrent sender that inserted it first wins (unique key) and its value is used. Raises the
    store's SQLAlchemyError when the store fails.
    """

    def __init__(self, store: Store, key: bytes, domain: str) -> None:
        self._store = store
        self._key = key
        self._domain = domain
        self._cache: dict[tuple[str, str], str] = {}

    def uid(self, original: str) -> str:
        return self._lookup("uid", original, lambda: f"2.25.{uuid.uuid4().int}")

    def patient(self, key: str) -> str:
        return self._lookup("patient", key, lambda: f"RG{secrets.token_hex(7).upper()}")

    def _lookup(self, kind: str, original: str, fresh: Callable[[], str]) -> str:
        digest = hmac.new(self._key, f"{kind}\0{original}".encode(), hashlib.sha256).hexdigest()
        value = self._cache.get((kind, digest))
        if value is not None:
            return value
        with self._store.session() as s:
            value = self._stored(s, kind, digest)
            if value is None:
                candidate = fresh()
                try:
                    with s.begin_nested():
                        s.add(
                            Pseudonym(
                                domain=self._domain,
                                kind=kind,
                                original_hash=digest,
                                pseudonym=candidate,
                                created_at=utcnow(),
                            )
                        )
                    value = candidate
                except IntegrityError:  # another node mapped it first: use theirs
                    value = self._stored(s, kind, digest)
                    assert value is not None
        self._cache[(kind, digest)] = value
        return value

    def _stored(self, s: Session, kind: str, digest: str) -> str | None:
        return s.scalar(
            select(Pseudonym.pseudonym).where(
                Pseudonym.domain == self._domain, Pseudonym.kind == kind, Pseudonym.original_hash == digest
            )
        )
