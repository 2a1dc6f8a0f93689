"""The templates as the real frontend (1.2x and 1.4x) lays them out: no two nodes overlap after loading
and after a run from the page (previews, report boxes), every note shows all its text, and the
templates that need the unpublished encoder say on the canvas how it is made and where it goes."""

from __future__ import annotations

import pytest
from comfy_frontend import dom_widget_on_screen, frontend_version, overlaps
from template_fixtures import ENCODER_FILE, WORKFLOWS
from workflow_api import load_workflow

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]
IDS = [p.stem for p in WORKFLOWS]
NEED_ENCODER = [p for p in WORKFLOWS if any(n["type"] == "DreamID_LoadIDEncoder" for n in load_workflow(p)["nodes"])]
NOTE_TYPES = {"Note", "MarkdownNote"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_no_two_nodes_overlap_after_loading(templates_in_app, browser_page, path):
    found = overlaps(templates_in_app.load(path))
    assert not found, f"{path.name} (frontend {frontend_version(browser_page)}) overlapping nodes:\n" + "\n".join(found)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_no_two_nodes_overlap_after_a_run(templates_in_app, comfy_server, browser_page, path):
    run = templates_in_app.run(path)
    assert run.result["status"] == "success", f"{path.name}: {run.result}\n{comfy_server.log_tail()}"
    found = overlaps(run.ran, ignore=run.added)  # the tiny CLIP the test added sits apart, left of the graph
    assert not found, f"{path.name} (frontend {frontend_version(browser_page)}) after a run:\n" + "\n".join(found)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_every_note_shows_all_its_text(templates_in_app, browser_page, path):
    boxes = templates_in_app.load(path)
    notes = {b["id"]: dom_widget_on_screen(browser_page, b["id"]) for b in boxes if b["type"] in NOTE_TYPES}
    assert notes, f"{path.name} has no note"
    for node_id, note in notes.items():  # on screen, and nothing of it behind a scroll bar
        assert note and note["visible"], f"{path.name}: note {node_id} is not shown: {note}"
        assert note["overflow"] <= 2, \
            f"{path.name} (frontend {frontend_version(browser_page)}): note {node_id} needs {note['overflow']} px more"


@pytest.mark.parametrize("path", NEED_ENCODER, ids=[p.stem for p in NEED_ENCODER])
def test_templates_needing_the_encoder_say_how_it_is_made_on_the_canvas(templates_in_app, browser_page, path):
    boxes = templates_in_app.load(path)
    shown = [dom_widget_on_screen(browser_page, b["id"]) for b in boxes if b["type"] in NOTE_TYPES]
    words = (ENCODER_FILE, "python -m training.train", "python -m training.export", "models/dreamidentity/")
    said = [s for s in shown if s and s["visible"] and all(w in s["shown"] for w in words)]
    assert said, f"{path.name}: no note on the canvas names {words}: {shown}"
