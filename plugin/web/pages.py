"""The console's HTML pages, behind a login (filled by the console)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
