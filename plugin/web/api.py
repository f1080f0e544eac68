"""The console's JSON REST API, mounted under ``/api`` behind a login (filled by the console)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
