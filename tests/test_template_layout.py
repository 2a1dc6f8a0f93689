"""The templates as the real frontend (1.2x and 1.4x) lays them out: no two nodes overlap after loading
and after a run from the page (previews, report boxes); the templates that need the unpublished
encoder say on the canvas how it is made and where it goes, and frontend 1.4x's missing-model list
names its folder instead of "Unknown" without offering a download (web/js/dreamid_models.js)."""

from __future__ import annotations

import shutil

import pytest
from comfy_env import ARTIFACTS
from comfy_frontend import (
    DETAILS_PANEL,
    dismiss_notices,
    dom_widget_on_screen,
    error_details,
    frontend_version,
    load_in_app,
    overlaps,
)
from template_fixtures import ENCODER_FILE, WORKFLOWS
from workflow_api import load_workflow

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]
IDS = [p.stem for p in WORKFLOWS]
NEED_ENCODER = [p for p in WORKFLOWS if any(n["type"] == "DreamID_LoadIDEncoder" for n in load_workflow(p)["nodes"])]
NOTE_TYPES = {"Note", "MarkdownNote"}
PORTRAIT = WORKFLOWS[0].parent / "dreamid_portrait_sd21.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_after_loading_no_node_overlaps_and_every_note_shows_all_its_text(templates_in_app, browser_page, path):
    # one load per template for the three checks of what the artist sees first (a load costs ~1 s)
    boxes = templates_in_app.load(path)
    version = frontend_version(browser_page)
    found = overlaps(boxes)
    assert not found, f"{path.name} (frontend {version}) overlapping nodes:\n" + "\n".join(found)
    notes = {b["id"]: dom_widget_on_screen(browser_page, b["id"]) for b in boxes if b["type"] in NOTE_TYPES}
    assert notes, f"{path.name} has no note"
    for node_id, note in notes.items():  # on screen, and nothing of it behind a scroll bar
        assert note and note["visible"], f"{path.name}: note {node_id} is not shown: {note}"
        assert note["overflow"] <= 2, f"{path.name} (frontend {version}): note {node_id} needs {note['overflow']} px more"
    if path in NEED_ENCODER:  # the templates that need the encoder say on the canvas how it is made
        words = (ENCODER_FILE, "python -m training.train", "python -m training.export", "models/dreamidentity/")
        said = [n for n in notes.values() if n and n["visible"] and all(w in n["shown"] for w in words)]
        assert said, f"{path.name}: no note on the canvas names {words}: {list(notes.values())}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_no_two_nodes_overlap_after_a_run(templates_in_app, comfy_server, browser_page, path):
    run = templates_in_app.run(path)
    assert run.result["status"] == "success", f"{path.name}: {run.result}\n{comfy_server.log_tail()}"
    found = overlaps(run.ran, ignore=run.added)  # the tiny CLIP the test added sits apart, left of the graph
    assert not found, f"{path.name} (frontend {frontend_version(browser_page)}) after a run:\n" + "\n".join(found)


def test_missing_encoder_is_listed_under_its_folder_with_no_download(templates_in_app, comfy_server, browser_page):
    page = browser_page
    encoder = comfy_server.models_dir("dreamidentity") / ENCODER_FILE
    aside = encoder.with_name(encoder.name + ".aside")
    shutil.move(encoder, aside)
    try:
        templates_in_app.open()  # the frontend reads the model folders afresh, without the file
        state = load_in_app(page, load_workflow(PORTRAIT))
        version = frontend_version(page)
        # what the page would save keeps no entry without a url: frontend 1.2x refuses such a workflow
        saved = page.evaluate("() => app.graph.serialize()")
        entries = [m for n in saved["nodes"] for m in (n.get("properties") or {}).get("models") or []]
        assert all(m.get("url") for m in entries), f"frontend {version} would save {entries}"
        if version.startswith("1.2"):
            # 1.2x names only files with a download URL: nothing about the encoder, and no schema alert
            assert state["notices"] == [], f"frontend {version}: {state['notices']}"
            return
        page.screenshot(path=str(ARTIFACTS / "missing-encoder-panel.png"))
        panel = page.locator(DETAILS_PANEL)
        told = panel.first.inner_text() if panel.count() and panel.first.is_visible() else error_details(page)
        lines = [line.strip() for line in told.splitlines()]
        assert ENCODER_FILE in lines, f"frontend {version}: the missing encoder is not listed: {told!r}"
        folder = lines[lines.index(ENCODER_FILE) + 1]
        assert folder == "dreamidentity" and "Unknown" not in lines, f"frontend {version}: {told!r}"
        buttons = page.evaluate("""(sel) => [...document.querySelectorAll(sel + ' button, ' + sel + ' a')]
            .map(b => [b.innerText, b.title, b.getAttribute('aria-label') ?? ''].join(' ').trim())""", DETAILS_PANEL)
        assert not [b for b in buttons if "download" in b.lower()], f"frontend {version} offers a download: {buttons}"
    finally:
        shutil.move(aside, encoder)
        dismiss_notices(page)
        templates_in_app.reopen_later()  # the next template is loaded in an app that sees the file again
