"""Users, passwords, login sessions and API tokens, in the job store (`plugin.store.accounts`).

Passwords are kept as argon2id hashes (argon2-cffi's defaults); a login with an unknown name still
verifies a hash, so a failed login takes about as long whether or not the name exists. Session ids
and API tokens are 256 random bits, handed out once and stored as their SHA-256.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, or_, select

from plugin.store.accounts import ApiToken, AuditEvent, User, WebSession
from plugin.store.engine import Store
from plugin.store.models import utcnow
from plugin.web.security import Identity, Principal, Role, secret_hash

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_PASSWORD_LENGTH = 8
TOKEN_PREFIX = "rgt_"
_TOUCH_EVERY = timedelta(minutes=1)  # a token's last use is written at most this often

_hasher = PasswordHasher()


@dataclass(frozen=True)
class UserInfo:
    """A user as listed: never the password hash."""

    name: str
    role: Role
    created_at: datetime
    tokens: int


@dataclass(frozen=True)
class NewSession:
    """A session just opened: the cookie's value (shown once) and its CSRF token."""

    session_id: str
    csrf_token: str
    principal: Principal


@cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def check_name(name: str) -> str:
    """A valid user name (1-64 letters, digits, ``_ . @ -``), else ValueError."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError("a user name is 1 to 64 letters, digits, '_', '.', '@' or '-'")
    return name


def add_user(store: Store, name: str, password: str, role: Role, hasher: PasswordHasher = _hasher) -> None:
    """Add a user; ValueError for a bad name, a short password or a name already taken. ``hasher``:
    argon2id with argon2-cffi's default cost (tests pass a cheaper one)."""
    check_name(name)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    hashed = hasher.hash(password)
    with store.session() as s:
        if s.scalar(select(User.id).where(User.name == name)) is not None:
            raise ValueError(f"user {name!r} exists already")
        s.add(User(name=name, role=role.label, password_hash=hashed, created_at=utcnow()))


def remove_user(store: Store, name: str) -> None:
    """Remove a user with their sessions and tokens; LookupError when there is none of that name."""
    with store.session() as s:
        user_id = s.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            raise LookupError(f"no user {name!r}")
        s.execute(delete(WebSession).where(WebSession.user_id == user_id))
        s.execute(delete(ApiToken).where(ApiToken.user_id == user_id))
        s.execute(delete(User).where(User.id == user_id))


def list_users(store: Store) -> list[UserInfo]:
    """Every user, by name, with how many API tokens they have."""
    with store.session() as s:
        users = s.scalars(select(User).order_by(User.name)).all()
        tokens: dict[int, int] = {}
        for user_id in s.scalars(select(ApiToken.user_id)):
            tokens[user_id] = tokens.get(user_id, 0) + 1
        return [UserInfo(u.name, Role.parse(u.role), u.created_at, tokens.get(u.id, 0)) for u in users]


def create_token(store: Store, name: str, label: str | None = None) -> str:
    """A new API token for user ``name``: returned once, stored only as its hash; LookupError when
    there is no such user."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.session() as s:
        user_id = s.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            raise LookupError(f"no user {name!r}")
        s.add(ApiToken(token_hash=secret_hash(token), user_id=user_id, label=label, created_at=utcnow()))
    return token


def verify_login(store: Store, name: str, password: str) -> Principal | None:
    """The user when ``password`` is theirs, else None; as slow for an unknown name as a known one."""
    with store.session() as s:
        user = (
            s.scalars(select(User).where(User.name == name)).first() if NAME_PATTERN.fullmatch(name) else None
        )
        stored = user.password_hash if user is not None else _dummy_hash()
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None:
        return None
    return Principal(user.name, Role.parse(user.role), "session")


ADDRESS_FACTOR = 4
"""An address is locked after this many times the failures that lock one name (it may try several names)."""


def login_locked(store: Store, name: str, remote: str | None, failures: int, minutes: int) -> bool:
    """True when the audit trail holds ``failures`` failed logins for ``name``, or ``ADDRESS_FACTOR``
    times as many from ``remote``, in the last ``minutes``: the login is refused without looking at
    the password. Read from the store, so nodes sharing one store share the count."""
    since = utcnow() - timedelta(minutes=minutes)
    failed = (AuditEvent.action == "login") & (AuditEvent.outcome == "failure") & (AuditEvent.at >= since)
    with store.session() as s:
        by_name, by_address = s.execute(
            select(
                func.count().filter(AuditEvent.actor == name),
                func.count().filter(AuditEvent.remote == remote),
            ).where(failed & or_(AuditEvent.actor == name, AuditEvent.remote == remote))
        ).one()
    return by_name >= failures or by_address >= failures * ADDRESS_FACTOR


def open_session(store: Store, principal: Principal, minutes: int) -> NewSession:
    """A new login session for ``principal`` lasting ``minutes`` from its last request; expired
    sessions of anyone are removed on the way."""
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as s:
        user_id = s.scalar(select(User.id).where(User.name == principal.name))
        if user_id is None:
            raise LookupError(f"no user {principal.name!r}")
        s.execute(delete(WebSession).where(WebSession.expires_at < now))
        s.add(
            WebSession(
                token_hash=secret_hash(session_id),
                user_id=user_id,
                csrf_token=csrf,
                created_at=now,
                expires_at=now + timedelta(minutes=minutes),
            )
        )
    return NewSession(session_id, csrf, principal)


def close_session(store: Store, session_id: str) -> None:
    """End a login session (nothing happens if it is gone already)."""
    with store.session() as s:
        s.execute(delete(WebSession).where(WebSession.token_hash == secret_hash(session_id)))


def session_identity(store: Store, session_id: str, minutes: int) -> Identity | None:
    """Who the session cookie ``session_id`` belongs to, or None when it is unknown or expired; a
    session past half its time is extended to ``minutes`` from now."""
    now = utcnow()
    with store.session() as s:
        row = s.execute(
            select(WebSession, User.name, User.role)
            .join(User, User.id == WebSession.user_id)
            .where(WebSession.token_hash == secret_hash(session_id))
        ).first()
        if row is None:
            return None
        session, name, role = row
        if session.expires_at <= now:
            s.delete(session)
            return None
        if session.expires_at - now < timedelta(minutes=minutes) / 2:
            session.expires_at = now + timedelta(minutes=minutes)
        return Identity(Principal(name, Role.parse(role), "session"), session.csrf_token)


def token_identity(store: Store, token: str) -> Identity | None:
    """Who the API token belongs to, or None when it is unknown."""
    now = utcnow()
    with store.session() as s:
        row = s.execute(
            select(ApiToken, User.name, User.role)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == secret_hash(token))
        ).first()
        if row is None:
            return None
        api_token, name, role = row
        if api_token.last_used_at is None or now - api_token.last_used_at > _TOUCH_EVERY:
            api_token.last_used_at = now
        return Identity(Principal(name, Role.parse(role), "token"), None)
