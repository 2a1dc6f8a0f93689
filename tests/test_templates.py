"""Static checks over every shipped workflow template (UI-format JSON): wiring that agrees at both
ends of every link, safe defaults, titles that say what a preview shows, and sizes tied together.
(Running each template on a real server, and opening it in a browser, is tests/test_workflows.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((PACK / "workflows").glob("*.json"))
IDS = [p.stem for p in WORKFLOWS]
#: what the frontend calls a node that has no title of its own
DEFAULT_TITLES = {"PreviewImage": "Preview Image", "SaveImage": "Save Image", "PreviewAny": "Preview Any"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def by_type(workflow: dict, node_type: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == node_type]


def widget_value(node: dict, name: str):
    """A widget's saved value: widgets_values follow the order of the node's widget inputs (for nodes
    without control_after_generate or upload widgets, which add extra values)."""
    names = [i["name"] for i in node.get("inputs") or [] if i.get("widget")]
    values = node.get("widgets_values") or []
    assert len(names) == len(values), f"node {node['id']}: widgets {names} vs values {values}"
    return values[names.index(name)]


def link_origin(workflow: dict, node: dict, input_name: str) -> tuple[int, int] | None:
    """(origin node id, slot) feeding ``input_name`` of ``node``, or None when it is not linked."""
    (inp,) = [i for i in node.get("inputs") or [] if i["name"] == input_name]
    if inp.get("link") is None:
        return None
    (link,) = [lk for lk in workflow["links"] if lk[0] == inp["link"]]
    return link[1], link[2]


def test_there_are_templates():
    assert len(WORKFLOWS) >= 5, WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_every_link_agrees_with_both_ends(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(lk[0] for lk in wf["links"])
    for lid, origin, oslot, target, tslot, ltype in wf["links"]:
        out = nodes[origin]["outputs"][oslot]
        inp = nodes[target]["inputs"][tslot]
        assert lid in (out.get("links") or []), f"link {lid} missing from node {origin} output {out['name']}"
        assert inp["link"] == lid, f"link {lid}: node {target} input {inp['name']} says {inp['link']}"
        assert out["type"] == ltype and inp["type"] in (ltype, "*"), (lid, out["type"], inp["type"], ltype)
    linked = {lk[0] for lk in wf["links"]}
    for n in wf["nodes"]:
        for o in n.get("outputs") or []:
            assert set(o.get("links") or []) <= linked, f"node {n['id']} output {o['name']}: dangling link ids"
        for i in n.get("inputs") or []:
            assert i.get("link") is None or i["link"] in linked, f"node {n['id']} input {i['name']}: dangling link"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_templates_never_overwrite_a_saved_identity(path):
    # re-running the save template with another person must not silently replace my_identity
    for node in by_type(load(path), "DreamID_SaveIDEmbedding"):
        assert widget_value(node, "overwrite") is False, f"{path.name}: node {node['id']} overwrites by default"


def test_the_save_template_is_checked():
    assert any(by_type(load(p), "DreamID_SaveIDEmbedding") for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_previews_are_titled_by_what_they_show(path):
    wf = load(path)
    shown = [n for n in wf["nodes"] if n["type"] in DEFAULT_TITLES]
    titles = [n.get("title") or DEFAULT_TITLES[n["type"]] for n in shown]
    assert len(titles) == len(set(titles)), f"{path.name}: two image/preview nodes share a title: {titles}"
    for node in shown:
        if node["type"] != "SaveImage":  # the result image needs no explanation; previews do
            assert node.get("title") and node["title"] != DEFAULT_TITLES[node["type"]], \
                f"{path.name}: {node['type']} {node['id']} has no title saying what it shows"


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if by_type(load(p), "DreamID_ScenePosition")],
                         ids=lambda p: p.stem)
def test_scene_canvas_is_the_latent_size(path):
    wf = load(path)
    (latent,) = by_type(wf, "EmptyLatentImage")
    for scene in by_type(wf, "DreamID_ScenePosition"):
        for side in ("width", "height"):
            origin = link_origin(wf, scene, side)
            assert origin is not None, f"{path.name}: the scene node's {side} is a separate widget"
            assert origin == link_origin(wf, latent, side), f"{side} of the scene and of the latent differ"
    widths = {link_origin(wf, latent, s) for s in ("width", "height")}
    assert len(widths) == 2, "width and height must not come from the same value"


def test_multi_photo_template_shows_the_encode_report():
    wf = load(PACK / "workflows" / "dreamid_multi_photo_average.json")
    (encode,) = by_type(wf, "DreamID_EncodeFace")
    slot = [o["name"] for o in encode["outputs"]].index("report")
    fed = [n for n in wf["nodes"] if any(link_origin(wf, n, i["name"]) == (encode["id"], slot)
                                         for i in n.get("inputs") or [])]
    assert [n["type"] for n in fed] == ["PreviewAny"]
