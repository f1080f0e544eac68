"""`radgate demo --viewer`: the demo study opened in OHIF Viewer 3.13 in a real Chromium, SEG over the CT.

The demo runs as a user runs it (its own process, real Orthanc with DICOMweb, the node, OHIF's
prebuilt files from scripts/setup.sh); the test reads the OHIF URL it prints, opens it in Debian's
headless Chromium, loads the SEG the way a person does (double-click, "Yes" to open it) and checks
from screenshots of the viewport, before and after, that the overlay lies on the lungs: coloured
pixels appear, on what was dark lung inside the body, and cover most of it, on both sides.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from scipy import ndimage
from support.browser import chromium_page

from plugin.config import load_config
from plugin.demo.viewer import ViewerError, ohif_dist

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

SLICES = 40
# OHIF's first-visit dialogs (investigational-use notice, the guided tour) would cover the viewport.
QUIET_OHIF = (
    "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
    "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
)
VIEWPORT_READY = (
    "() => { const e = window.cornerstone && window.cornerstone.getEnabledElements();"
    " return !!(e && e.length && e[0].viewport.getImageIds().length); }"
)
SHOW_SLICE = (  # asks until the viewport has taken it: OHIF may still be setting up its first image
    "(i) => { const v = window.cornerstone.getEnabledElements()[0].viewport;"
    " if (v.getCurrentImageIdIndex() === i) { return true; } v.setImageIdIndex(i); return false; }"
)
MEASUREMENTS = (  # what OHIF's measurement panel lists: label and the value it shows
    "() => window.services.measurementService.getMeasurements()"
    ".map(m => [m.label || null, (m.displayText && m.displayText.primary[0]) || null])"
)
SEGMENTS_LOADED = "() => window.services.segmentationService.getSegmentations().length"
SEGMENT_COLOURS = (  # label -> RGBA as OHIF draws it
    "() => { const s = window.services.segmentationService, seg = s.getSegmentations()[0];"
    " const viewport = window.cornerstone.getEnabledElements()[0].viewport.id;"
    " return Object.fromEntries(Object.values(seg.segments).map("
    " x => [x.label, s.getSegmentColor(viewport, seg.segmentationId, x.segmentIndex)])); }"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`radgate demo --viewer` running; yields the OHIF URL of the study it printed, and its folder."""
    try:
        ohif_dist()
    except ViewerError as exc:
        pytest.skip(str(exc))
    workdir = tmp_path_factory.mktemp("demo-viewer")
    command = [
        sys.executable,
        "-m",
        "plugin.cli",
        "demo",
        "--viewer",
        "--rows",
        "64",
        "--slices",
        str(SLICES),
    ]
    process = subprocess.Popen(
        [*command, "--timeout", "180", "--dir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hung demo is stopped with its Orthanc and node
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str | None] = queue.Queue()  # None: the demo closed its output

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while not seen or not seen[-1].startswith("Open it in OHIF: "):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the demo printed no OHIF URL within 240 s:\n" + "".join(seen))
            if line is None:
                pytest.fail("the demo ended without an OHIF URL:\n" + "".join(seen))
            seen.append(line)
        yield seen[-1].split(": ", 1)[1].strip(), workdir
    finally:
        process.terminate()  # the demo alone, as its stop stops the rest (a group-wide signal is slower)
        try:
            assert process.wait(60) == 0, "".join(seen)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def stable_screenshot(target: Locator, path: Path, timeout: float = 20.0) -> npt.NDArray[np.int16]:
    """RGB pixels of ``target`` once two screenshots in a row are equal (rendering settled); saved to path."""
    deadline = time.monotonic() + timeout
    last = target.screenshot()
    while True:
        shot = target.screenshot()
        if shot == last:
            path.write_bytes(shot)
            return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)
        if time.monotonic() > deadline:
            raise AssertionError(f"the viewport kept changing for {timeout:.0f} s")
        last = shot


def show_slice(page: Page, index: int) -> None:
    page.wait_for_function(SHOW_SLICE, arg=index, polling=200, timeout=20_000)


def coloured(rgb: npt.NDArray[np.int16]) -> npt.NDArray[np.bool_]:
    """Pixels with a hue: the SEG's segment colours; the CT itself is drawn in grey."""
    return np.asarray(rgb.max(axis=2) - rgb.min(axis=2) > 12)


def inside_body_and_dark(grey: npt.NDArray[np.int16]) -> npt.NDArray[np.bool_]:
    """Dark pixels (lung, airway) with bright body tissue on all four sides: not the air around the body."""
    bright = grey > 170
    left = np.maximum.accumulate(bright, axis=1)
    right = np.maximum.accumulate(bright[:, ::-1], axis=1)[:, ::-1]
    up = np.maximum.accumulate(bright, axis=0)
    down = np.maximum.accumulate(bright[::-1], axis=0)[::-1]
    return np.asarray((grey < 140) & left & right & up & down)


def test_the_consoles_open_in_viewer_link_is_the_study_in_the_demos_ohif(demo: tuple[str, Path]) -> None:
    url, workdir = demo
    config = load_config(workdir / "node" / "radgate.yaml")
    assert config.web.viewer_url(url.rsplit("=", 1)[1]) == url


def test_the_demo_study_opens_in_ohif_with_the_lungs_overlaid_where_the_lungs_are(
    demo: tuple[str, Path], chromium: Browser, tmp_path: Path
) -> None:
    with chromium_page(chromium) as page:
        page.add_init_script(QUIET_OHIF)
        page.goto(demo[0])
        page.wait_for_function(VIEWPORT_READY, timeout=60_000)
        viewport = page.locator('[data-cy="viewport-pane"]').first
        middle = SLICES // 2
        show_slice(page, middle)
        before = stable_screenshot(viewport, tmp_path / "viewport-ct.png")
        page.screenshot(path=str(tmp_path / "ohif-ct.png"))

        page.locator('[data-cy="study-browser-thumbnail-no-image"]', has_text="SEG").first.dblclick()
        page.locator('[data-cy="yes-hydrate-btn"]').click(timeout=30_000)
        page.wait_for_function(SEGMENTS_LOADED, timeout=30_000)
        show_slice(page, middle)
        after = stable_screenshot(viewport, tmp_path / "viewport-seg.png")
        page.locator('[data-cy="panelSegmentation-btn"]').click()  # the segment list, for a person to see
        page.get_by_text("Left lung").first.wait_for(timeout=10_000)
        page.screenshot(path=str(tmp_path / "ohif-seg.png"))
        segments = page.locator("body").inner_text()
        colours = page.evaluate(SEGMENT_COLOURS)

    assert before.shape == after.shape
    labels, _count = ndimage.label(before.mean(axis=2) > 170)  # the body: the largest bright region
    body = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    [box] = ndimage.find_objects((labels == body).astype(np.int32))  # not the text in the corners
    before, after = before[box], after[box]
    grey = before.mean(axis=2)
    assert coloured(before).sum() < 50, "the CT alone already shows colour"
    overlay = coloured(after)
    lung = inside_body_and_dark(grey)
    assert lung.sum() > 2000, "no dark lung inside the body on the middle slice"
    assert overlay.sum() > 0.5 * lung.sum(), (
        f"too little overlay: {overlay.sum()} px for {lung.sum()} px of lung"
    )
    on_lung = (overlay & lung).sum() / overlay.sum()
    covered = (overlay & lung).sum() / lung.sum()
    assert on_lung > 0.85, f"only {on_lung:.0%} of the overlay lies on dark lung inside the body"
    assert covered > 0.75, f"the overlay covers only {covered:.0%} of the dark lung inside the body"
    # OHIF shows the patient's right on the image's left: there the overlay has the right lung's colour
    greener = after[..., 1] > after[..., 2]
    right, left = (colours[f"{side} lung"] for side in ("Right", "Left"))
    assert (right[1] > right[2]) != (left[1] > left[2]), colours  # green and blue tell the lungs apart
    half = overlay.shape[1] // 2
    for image_side, lung_colour in ((slice(None, half), right), (slice(half, None), left)):
        pixels = overlay[:, image_side]
        share = (greener[:, image_side] == (lung_colour[1] > lung_colour[2]))[pixels].mean()
        assert pixels.sum() > 1000 and share > 0.9, (image_side, pixels.sum(), share)
    for label in ("Right lung", "Left lung", "Emphysema"):
        assert label in segments, segments


def sr_planar_values(workdir: Path) -> dict[str, float]:
    """The node's SR: each planar measurement group's Comment (its label) and its measured value."""
    [path] = (workdir / "node" / "data" / "results").glob("*/SR-*.dcm")
    [imaging] = (
        i for i in pydicom.dcmread(path).ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    values = {}
    for group in imaging.ContentSequence:
        comments = [
            i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121106"
        ]
        numbers = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        if comments:
            values[comments[0]] = float(numbers[0].MeasuredValueSequence[0].NumericValue)
    return values


def test_the_srs_measurements_are_listed_in_ohif_with_their_labels_and_values(
    demo: tuple[str, Path], chromium: Browser, tmp_path: Path
) -> None:
    url, workdir = demo
    expected = sr_planar_values(workdir)
    for lung in ("Right lung", "Left lung", "Both lungs"):
        for name in ("Volume (cm3)", "Attenuation Coefficient ([hnsf'U])"):
            assert f"{lung}: {name}" in expected, expected
    with chromium_page(chromium) as page:
        page.add_init_script(QUIET_OHIF)
        page.goto(url)
        page.wait_for_function(VIEWPORT_READY, timeout=60_000)
        page.locator('[data-cy="study-browser-thumbnail-no-image"]', has_text="SR").first.dblclick()
        page.locator('[data-cy="yes-hydrate-btn"]').click(timeout=30_000)
        page.wait_for_function(
            f"() => window.services.measurementService.getMeasurements().length >= {len(expected)}",
            timeout=30_000,
        )
        listed = {label: shown for label, shown in page.evaluate(MEASUREMENTS) if label}
        page.locator('[data-cy="trackedMeasurements-btn"]').click()
        page.get_by_text("Left lung: Volume").first.wait_for(timeout=10_000)
        stable_screenshot(page.locator("body"), tmp_path / "ohif-sr.png")  # kept for docs/
        panel = page.locator("body").inner_text()

    for label, value in expected.items():
        assert label[:40] in panel, label  # the panel cuts long labels
        shown = listed.get(label)
        assert shown is not None, (label, listed)
        assert abs(float(shown) - value) <= max(0.01 * abs(value), 0.01), (label, shown, value)
