"""What a node reports ({"ui": {"text": [...]}}) shows on that node in the real frontend (1.2x and 1.4x):
web/js/dreamid_text.js puts it in a read-only box on the node. Each template is run from the page
(``app.queuePrompt``) on the tiny test models; the box is read from the DOM with the node on screen."""

from __future__ import annotations

import re

import pytest
from comfy_frontend import frontend_version
from template_fixtures import WORKFLOWS
from workflow_api import load_workflow

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]
BY_NAME = {p.stem: p for p in WORKFLOWS}
MAX_LINES, LINE_PX = 4, 14  # web/js/dreamid_text.js: a report box grows to 4 lines of 14 px, then scrolls
REPORTING = [p for p in WORKFLOWS if any(n["type"].startswith("DreamID_") for n in load_workflow(p)["nodes"])]


def ran(templates_in_app, server, name: str):
    run = templates_in_app.run(BY_NAME[name])
    assert run.result["status"] == "success", f"{name}: {run.result}\n{server.log_tail()}"
    return run


def assert_on_node(run, node_id: str, page) -> str:
    """The report box of ``node_id`` shows exactly what the node said, visibly, inside the node."""
    said = run.texts[node_id]
    shown = run.reports.get(node_id)
    version = frontend_version(page)
    assert shown is not None, f"{run.name} (frontend {version}): node {node_id} said {said!r} but has no report box"
    assert shown["text"] == said, f"{run.name}: node {node_id} shows {shown['text']!r}, said {said!r}"
    assert shown["visible"], f"{run.name} (frontend {version}): node {node_id}'s report box is hidden: {shown}"
    ex, ey, ew, eh = shown["element"]
    nx, ny, nw, nh = shown["node"]
    assert nx - 1 <= ex and ex + ew <= nx + nw + 1 and ny - 1 <= ey and ey + eh <= ny + nh + 1, \
        f"{run.name} (frontend {version}): node {node_id}'s report box {shown['element']} is not on the node {shown['node']}"
    # all of it in view, unless the box already has its largest size (MAX_LINES lines) and scrolls the rest
    assert shown["overflow"] <= 2 or eh >= MAX_LINES * LINE_PX, \
        f"{run.name} (frontend {version}): node {node_id}'s report needs {shown['overflow']} px of scrolling: {shown}"
    return shown["text"]


@pytest.mark.parametrize("path", REPORTING, ids=[p.stem for p in REPORTING])
def test_every_text_a_node_reports_shows_on_that_node(templates_in_app, comfy_server, browser_page, path):
    run = ran(templates_in_app, comfy_server, path.stem)
    types = {b["id"]: b["type"] for b in run.ran}
    ours = [i for i in run.texts if types.get(i, "").startswith("DreamID_")]  # core nodes show their own
    assert ours, f"{path.stem}: no DreamID node reported any text: {run.result['executed']}"
    for node_id in ours:
        assert_on_node(run, node_id, browser_page)


def test_learn_template_shows_the_summary_and_where_it_saved(templates_in_app, comfy_server, browser_page):
    run = ran(templates_in_app, comfy_server, "dreamid_learn_identity")
    types = {b["id"]: b["type"] for b in run.ran}
    (learn,) = [i for i, t in types.items() if t == "DreamID_LearnIdentity"]
    (save,) = [i for i, t in types.items() if t == "DreamID_SaveLearnedIdentity"]
    summary = assert_on_node(run, learn, browser_page)
    assert re.match(r"1 steps, loss \d+\.\d+ -> \d+\.\d+, face attention", summary), summary  # TINY_IN_APP: 1 step
    assert "norms clip_h" in summary
    saved = assert_on_node(run, save, browser_page)
    assert saved.startswith("saved ") and "browser_learned_identity.safetensors" in saved, saved
    assert "embedding:browser_learned_identity" in saved


def test_encode_face_shows_the_photos_used_and_skipped(templates_in_app, comfy_server, browser_page):
    # the multi-photo template with its second photo replaced by one without a face, on_missing = skip
    run = ran(templates_in_app, comfy_server, "dreamid_multi_photo_average")
    (encode,) = [b["id"] for b in run.ran if b["type"] == "DreamID_EncodeFace"]
    report = assert_on_node(run, encode, browser_page)
    assert report.startswith("1 of 2 photo(s) encoded (image 0); 1 skipped."), report
    assert re.search(r"^skipped image 1: .*face", report, re.M), report


def test_save_embedding_shows_where_it_saved(templates_in_app, comfy_server, browser_page):
    run = ran(templates_in_app, comfy_server, "dreamid_save_identity_embedding")
    (save,) = [b["id"] for b in run.ran if b["type"] == "DreamID_SaveIDEmbedding"]
    saved = assert_on_node(run, save, browser_page)
    assert saved.startswith("saved ") and "browser_identity.safetensors" in saved, saved
    assert "embedding:browser_identity" in saved
    assert (comfy_server.models_dir("embeddings") / "browser_identity.safetensors").is_file()
