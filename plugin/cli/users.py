"""``radgate users add|list|remove|token``: the web console's users, managed on the node."""

from __future__ import annotations

import getpass
import json
import sys

from plugin.config import Config
from plugin.store.engine import migrated_store
from plugin.web.audit import record
from plugin.web.security import Role
from plugin.web.users import UserInfo, add_user, create_token, list_users, remove_user


def cli_actor() -> str:
    """Who runs the command, as the audit trail names a change made on the node itself."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid
        return "cli"


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask for the password: give it on stdin with --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _print_users(users: list[UserInfo], as_json: bool) -> None:
    if as_json:
        rows = [
            {"name": u.name, "role": u.role.label, "created_at": u.created_at.isoformat(), "tokens": u.tokens}
            for u in users
        ]
        print(json.dumps(rows, indent=2))
    elif not users:
        print("no users: add the first with `radgate users add NAME --role admin`")
    for u in [] if as_json else users:
        print(f"{u.name:<24} {u.role.label:<9} {u.tokens} token(s), since {u.created_at:%Y-%m-%d %H:%M} UTC")


def command(
    config: Config, action: str, name: str | None, role: str, password_stdin: bool, as_json: bool
) -> int:
    """Run one ``radgate users`` action; 0 when done, 1 with the reason on stderr otherwise. A new
    token is printed once, on stdout; nothing else ever prints a password or a token."""
    try:
        with migrated_store(config.db_url) as store:
            if action == "list":
                _print_users(list_users(store), as_json)
                return 0
            assert name is not None
            if action == "add":
                level = Role.parse(role)
                add_user(store, name, _read_password(password_stdin), level)
                record(store, cli_actor(), "user.add", name, detail={"role": level.label})
                print(f"user {name} added ({level.label})")
            elif action == "remove":
                remove_user(store, name)
                record(store, cli_actor(), "user.remove", name)
                print(f"user {name} removed, with their sessions and tokens")
            else:
                token = create_token(store, name)
                record(store, cli_actor(), "user.token", name)
                print(token)
                print("shown once: keep it; send it as `Authorization: Bearer TOKEN`", file=sys.stderr)
            return 0
    except (LookupError, ValueError) as err:
        print(f"radgate: {err}", file=sys.stderr)
        return 1
