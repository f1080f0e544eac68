"""`radgate users` on a real store: the token it prints once opens the API of a console on that store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from support.web import web_config, web_node

from plugin.cli.main import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_users_add_list_token_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-secret\n"))
    assert _run(capsys, "users", "add", "scripter", "--role", "operator", "--password-stdin", *data)[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    status, _, err = _run(capsys, "users", "add", "other", "--password-stdin", *data)
    assert status == 1 and "at least 8 characters" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-secret\n"))
    status, _, err = _run(capsys, "users", "add", "scripter", "--password-stdin", *data)
    assert status == 1 and "exists already" in err
    status, token, _ = _run(capsys, "users", "token", "scripter", *data)
    token = token.strip()
    assert status == 0 and token.startswith("rgt_")
    status, listed, _ = _run(capsys, "users", "list", "--json", *data)
    assert [(u["name"], u["role"], u["tokens"]) for u in json.loads(listed)] == [("scripter", "operator", 1)]
    assert "argon2" not in listed and token not in listed

    with web_node(tmp_path, web_config(tmp_path)) as console, console.client() as client:
        me = client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()
        assert (me["name"], me["role"], me["via"], me["csrf_token"]) == ("scripter", "operator", "token", "")
        status, out, _ = _run(capsys, "users", "remove", "scripter", *data)
        assert status == 0 and "removed" in out
        assert client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    status, _, err = _run(capsys, "users", "remove", "scripter", *data)
    assert status == 1 and "no user 'scripter'" in err
    status, exported, _ = _run(capsys, "audit", "export", "--no-studies", *data)
    actions = [json.loads(line)["action"] for line in exported.splitlines()]
    assert "auth.rejected" in actions  # the removed user's token, refused
    assert [a for a in actions if a.startswith("user.")] == ["user.add", "user.token", "user.remove"]
