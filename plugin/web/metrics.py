"""``/metrics`` in Prometheus' text format, reachable without a login (filled by metrics)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
