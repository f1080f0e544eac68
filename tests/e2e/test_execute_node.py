"""End to end, lite: `radgate serve` receives by DCMTK, routes at completion, runs ct-lung, lists the job."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from support.node import RADGATE, NodeProcess, wait_for, write_series

from dicom_io.testing.synthetic import ct_chest_phantom

RULES = [{"name": "chest", "match": {"Modality": {"equals": "CT"}}, "pipeline": "ct-lung"}]


def _finished(node: NodeProcess, count: int) -> list[dict[str, Any]]:
    """Every job once ``count`` of them have ended; empty until then."""
    jobs = node.jobs(cli=False)
    done = [j for j in jobs if j["state"] in ("SUCCEEDED", "FAILED")]
    return jobs if len(done) == count else []


def _seg(results_dir: Path) -> pydicom.Dataset:
    [seg] = results_dir.glob("SEG-*.dcm")
    return pydicom.dcmread(seg, stop_before_pixels=True)


@pytest.mark.slow  # ct-lung runs three times in a worker process
def test_a_study_is_routed_run_listed_and_rerun_when_it_grows_and_a_bad_one_fails(tmp_path: Path) -> None:
    settings = {"rules": RULES, "dicom": {"receivers": 1}}
    node = NodeProcess(tmp_path, settings).start()  # receiving in the node's process: no processes to start
    try:
        bad = write_series(tmp_path / "bad", 3)  # CT, matches the rule, too few slices for ct-lung
        assert node.storescu(*bad).returncode == 0
        phantom = ct_chest_phantom(rows=64, columns=64, slices=40, seed=5)
        slices = phantom.write(tmp_path / "phantom")
        sent = node.storescu(*slices[:36])
        assert sent.returncode == 0, sent.stderr
        first = wait_for(lambda: _finished(node, 2), 240, "both jobs to finish", interval=0.5)
        [failed] = [j for j in first if j["study_uid"] != phantom.study_uid]
        [succeeded] = [j for j in first if j["study_uid"] == phantom.study_uid]
        assert node.storescu(*slices[36:]).returncode == 0  # the study grows after its results were made
        finished = wait_for(lambda: _finished(node, 3), 240, "the rerun", interval=0.5)
        [rerun] = [j for j in finished if j["revision"] == 2]
    finally:
        assert node.stop() == 0, node.log()

    bad_study = pydicom.dcmread(bad[0], stop_before_pixels=True).StudyInstanceUID
    assert (failed["study_uid"], failed["state"], failed["attempts"]) == (bad_study, "FAILED", 1)
    assert failed["error"] == "ct-lung: only 3 slices, this pipeline needs at least 5"

    assert (succeeded["study_uid"], succeeded["series_uid"]) == (phantom.study_uid, phantom.series_uid)
    assert (succeeded["state"], succeeded["pipeline"], succeeded["rule"]) == ("SUCCEEDED", "ct-lung", "chest")
    assert succeeded["error"] is None and succeeded["deliveries"] == {}
    assert set(succeeded["timings"]) == {"load_s", "infer_s", "encode_s"}
    files = sorted(Path(succeeded["results_dir"]).glob("*.dcm"))
    kinds = {str(pydicom.dcmread(f, stop_before_pixels=True).Modality) for f in files}
    assert kinds == {"SEG", "SR", "OT"}, files
    assert Path(succeeded["results_dir"]).parent == node.data_dir / "results"
    assert (rerun["revision"], rerun["state"], rerun["series_uid"]) == (2, "SUCCEEDED", phantom.series_uid)
    old, new = (_seg(Path(job["results_dir"])) for job in (succeeded, rerun))
    assert int(new.SeriesNumber) > int(old.SeriesNumber) and new.SOPInstanceUID != old.SOPInstanceUID
    assert str(new.SeriesDescription).startswith("radgate (supersedes rev 1) ")

    log = node.log()
    assert "Traceback" in log and "PipelineError: ct-lung: only 3 slices" in log  # the reason's origin
    assert "Phantom" not in log and "RG-SYN-CT" not in log  # no patient name or ID
    table = subprocess.run(
        [str(RADGATE), "jobs", "--config", str(node.config_path)], capture_output=True, text=True, check=True
    )
    assert "SUCCEEDED" in table.stdout and "only 3 slices" in table.stdout


def test_a_rule_naming_an_unknown_pipeline_stops_the_start(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, {"rules": [{**RULES[0], "pipeline": "ct-lunk"}]})
    result = subprocess.run(
        [str(RADGATE), "serve", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "rule 'chest': unknown pipeline 'ct-lunk'" in result.stderr
