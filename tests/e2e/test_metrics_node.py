"""``/metrics`` of a real `radgate serve` (two receiving processes) after real DCMTK senders: what
was stored, received again and refused, by reason, as the node answered them; no login needed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.node import NodeProcess, wait_for, write_series

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

MAX_DATASET = 64 << 10


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    settings = {
        "dicom": {
            "receivers": 2,
            "max_dataset_bytes": MAX_DATASET,
            "allowed_peers": [{"ae_title": "STORESCU"}],
        },
        "web": {},  # the console (and /metrics) on a port of its own choosing: its URL is in the log
    }
    n = NodeProcess(tmp_path_factory.mktemp("metrics") / "node", settings).start()
    yield n
    assert n.stop() == 0, n.log()


def metrics_url(node: NodeProcess) -> str:
    [url] = re.findall(r"web console: (http://127\.0\.0\.1:\d+)/", node.log())
    return f"{url}/metrics"


def scrape(node: NodeProcess) -> Samples:
    """GET /metrics without a session; its text parsed back: (name, sorted labels) -> value."""
    answer = httpx.get(metrics_url(node), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def test_metrics_count_what_the_node_stored_and_refused(node: NodeProcess, tmp_path: Path) -> None:
    wait_for(lambda: _answers(node), 30, "/metrics to answer")
    before = scrape(node)
    assert before[("radgate_store_up", ())] == 1
    assert 0 < before[("radgate_disk_free_bytes", ())] <= before[("radgate_disk_total_bytes", ())]
    assert not any(name.startswith("radgate_gpu") for name, _ in before)  # no GPU on this machine

    files = write_series(tmp_path / "small", 3)
    sent = node.storescu(*files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    again = node.storescu(files[0])
    assert again.returncode == 0, again.stdout + again.stderr
    [big] = write_series(tmp_path / "big", 1, size=256)  # 128 KiB of pixels: past max_dataset_bytes
    refused = node.storescu(big)
    assert "Error: CannotUnderstand" in refused.stderr  # 0xC000
    stranger = node.storescu(files[1], calling_ae="STRANGER")
    assert "rejected" in (stranger.stdout + stranger.stderr).lower()

    spooled = sum(path.stat().st_size for path in (node.data_dir / "spool").rglob("*.dcm"))

    def counted() -> Samples | None:
        got = scrape(node)
        return got if got.get(("radgate_study_completions_total", ()), 0) >= 1 else None

    got = wait_for(counted, 60, "the study to complete")  # quiet period 2 s
    assert got[("radgate_instances_received_total", ())] == 3
    assert got[("radgate_received_bytes_total", ())] == spooled
    assert got[("radgate_instances_duplicate_total", ())] == 1
    too_large = (("reason", "dataset_too_large"), ("status", "0xC000"))
    assert got[("radgate_instances_refused_total", too_large)] == 1
    assert got[("radgate_associations_refused_total", (("reason", "peer_not_allowed"),))] == 1
    assert got[("radgate_study_completions_total", ())] == 1
    assert got[("radgate_studies_receiving", ())] == 0


def _answers(node: NodeProcess) -> bool:
    try:
        return httpx.get(metrics_url(node), timeout=5).is_success
    except httpx.TransportError:
        return False
