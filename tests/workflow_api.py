"""UI-format workflow JSON (what the frontend saves) → API-format prompt (what POST /prompt takes).

:func:`ui_to_api` reproduces the frontend's ``app.graphToPrompt()`` from the server's /object_info:

- Widgets: each node's widget inputs (INT, FLOAT, STRING, BOOLEAN, COMBO lists/"COMBO"; not
  ``forceInput``), required then optional in ``input_order``, take ``widgets_values`` in order. Extra
  saved values with no API input are skipped: the ``control_after_generate`` value after an INT
  flagged ``control_after_generate`` or (unless flagged False) named ``seed``/``noise_seed``, the
  control + ``control_filter_list`` values after a COMBO flagged ``control_after_generate``,
  and the "upload" button value that the frontend appends after the LAST required widget of a node
  with an ``image_upload``/``video_upload``/``animated_image_upload`` combo (LoadImage: ``[name, "image"]``).
  ``widgets_values`` given as a dict is read by widget name.
- Links: a linked input becomes ``[origin_id, origin_slot]``; a widget converted to an input and fed
  by a link takes the link. Followed through ``Reroute`` nodes and bypassed nodes (mode 4: same-index
  input of the output's type, else the first input of that type), like the frontend.
- Dropped: ``Note``/``MarkdownNote`` and muted nodes (mode 2), and inputs fed by them; a
  ``PrimitiveNode`` is dropped and its value (``widgets_values[0]``) becomes the target's input, as
  the frontend copies it into the target widget. Native link reroutes (``extra.reroutes``) need nothing.
- Not supported (raises NotImplementedError): subgraphs (``definitions.subgraphs``) and legacy group
  nodes (``extra.groupNodes``), and widgets added by frontend extensions for custom types.

The rewiring helpers edit API prompts in place, e.g. :func:`use_tiny_clip` swaps every CLIP output of a
CheckpointLoaderSimple for a ``DreamIDTest_TinyCLIP`` node (a tiny CLIP cannot live in a checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_SKIP = {"Note", "MarkdownNote", "PrimitiveNode"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
MODE_MUTED, MODE_BYPASS = 2, 4


def load_workflow(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _is_widget(spec) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def widget_slots(node_def: dict) -> list[str | None]:
    """The node's saved widget values in order: an input name, or None for a value to skip."""
    slots: list[str | None] = []
    inputs, order = node_def.get("input", {}), node_def.get("input_order", {})
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        upload = False
        for name in order.get(section, list(specs)):
            spec = specs.get(name)
            if not _is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            slots.append(name)
            is_combo = isinstance(spec[0], list) or spec[0] == "COMBO"
            if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                slots.append(None)  # the control_after_generate combo
            elif is_combo and opts.get("control_after_generate"):
                slots += [None, None]  # control_after_generate + control_filter_list
            upload = upload or any(opts.get(flag) for flag in UPLOAD_FLAGS)
        if section == "required" and upload:
            slots.append(None)
    return slots


def _widget_values(node: dict, node_def: dict) -> dict:
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return {k: v for k, v in values.items() if k in {s for s in widget_slots(node_def) if s}}
    slots, values = widget_slots(node_def), values or []
    if len(values) != len(slots):  # older save or extension widgets: values may be misaligned
        log.warning("node %s (%s): %d widgets_values for %d widget slots %s", node.get("id"), node.get("type"),
                    len(values), len(slots), slots)
    out = {}
    for name, value in zip(slots, values, strict=False):
        if name is not None:
            out[name] = value
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API prompt ``{id: {class_type, inputs, _meta}}``."""
    if (workflow.get("definitions") or {}).get("subgraphs") or (workflow.get("extra") or {}).get("groupNodes"):
        raise NotImplementedError("subgraphs / group nodes are not supported by ui_to_api")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # newer serialisation
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                    link["target_slot"], link.get("type")]
        links[link[0]] = link

    def resolve(link_id, seen=()):
        """(origin node, slot) of a link after reroutes/bypass; None when it leads nowhere real."""
        link = links.get(link_id)
        if link is None or link_id in seen:
            return None
        origin, slot, ltype = nodes.get(link[1]), link[2], link[5]
        if origin is None or origin.get("mode") == MODE_MUTED or origin["type"] in VIRTUAL_SKIP:
            return None
        inputs = origin.get("inputs") or []
        if origin["type"] == "Reroute":
            return resolve(inputs[0].get("link"), (*seen, link_id)) if inputs else None
        if origin.get("mode") == MODE_BYPASS:
            same = [slot] if slot < len(inputs) and inputs[slot].get("type") == ltype else []
            for i in same + [i for i, inp in enumerate(inputs) if inp.get("type") == ltype]:
                if inputs[i].get("link") is not None:
                    return resolve(inputs[i]["link"], (*seen, link_id))
            return None
        return str(origin["id"]), slot

    prompt = {}
    for node in workflow["nodes"]:
        ctype = node["type"]
        if ctype in VIRTUAL_SKIP or ctype == "Reroute" or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        node_def = object_info.get(ctype)
        if node_def is None:
            raise KeyError(f"node {node['id']}: type {ctype!r} is not in /object_info (missing node pack?)")
        inputs = _widget_values(node, node_def)
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            origin = links.get(inp["link"])
            primitive = nodes.get(origin[1], {}) if origin is not None else {}
            if primitive.get("type") == "PrimitiveNode":  # the frontend copies its value into the widget
                if primitive.get("widgets_values"):
                    inputs[inp["name"]] = primitive["widgets_values"][0]
                continue
            ref = resolve(inp["link"])
            if ref is None:
                inputs.pop(inp["name"], None)
            else:
                inputs[inp["name"]] = [ref[0], ref[1]]
        title = node.get("title") or node_def.get("display_name") or ctype
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": ctype, "_meta": {"title": title}}
    return prompt


# ---- rewiring API prompts ---------------------------------------------------------------------
def new_id(prompt: dict) -> str:
    return str(max((int(k) for k in prompt if str(k).isdigit()), default=0) + 1)


def add_node(prompt: dict, class_type: str, inputs: dict, node_id: str | None = None) -> str:
    node_id = node_id or new_id(prompt)
    prompt[node_id] = {"inputs": dict(inputs), "class_type": class_type, "_meta": {"title": class_type}}
    return node_id


def replace_links(prompt: dict, old: tuple[str, int], new: tuple[str, int]) -> int:
    """Point every input linked to output ``old`` (node id, slot) at ``new``; returns how many."""
    count = 0
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and (str(value[0]), value[1]) == (str(old[0]), old[1]):
                node["inputs"][name] = [str(new[0]), new[1]]
                count += 1
    return count


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def set_inputs(prompt: dict, class_type: str, **values) -> list[str]:
    """Set widget inputs on every node of ``class_type``; returns their ids."""
    ids = nodes_of(prompt, class_type)
    for k in ids:
        prompt[k]["inputs"].update(values)
    return ids


def use_tiny_clip(prompt: dict, kind: str = "sd2", width: int = 0, init_seed: int = 0,
                  loaders: tuple[str, ...] = ("CheckpointLoaderSimple",)) -> dict:
    """Feed every consumer of a checkpoint loader's CLIP output (slot 1) from a new
    ``DreamIDTest_TinyCLIP`` node instead; returns ``{loader id: tiny clip id}``."""
    made = {}
    for loader in [k for c in loaders for k in nodes_of(prompt, c)]:
        clip_id = add_node(prompt, "DreamIDTest_TinyCLIP", {"kind": kind, "width": width, "init_seed": init_seed})
        if replace_links(prompt, (loader, 1), (clip_id, 0)) == 0:
            del prompt[clip_id]
        else:
            made[loader] = clip_id
    return made


def use_tiny_dit(prompt: dict, init_seed: int = 0) -> dict:
    """Feed the consumers of every ``DualCLIPLoader`` (its ``type`` "flux" or "sd3") from a tiny CLIP of
    that kind, and of every ``UNETLoader`` from a ``DreamIDTest_TinyDiT`` of the graph's DiT kind; returns
    ``{loader id: tiny node id}``."""
    made = {}
    kinds = {v["inputs"].get("type") for v in prompt.values() if v["class_type"] == "DualCLIPLoader"}
    for loader in nodes_of(prompt, "DualCLIPLoader"):
        kind = prompt[loader]["inputs"]["type"]
        tiny = add_node(prompt, "DreamIDTest_TinyCLIP", {"kind": kind, "width": 0, "init_seed": init_seed})
        if replace_links(prompt, (loader, 0), (tiny, 0)):
            made[loader] = tiny
    for loader in nodes_of(prompt, "UNETLoader"):
        kind = "sd3" if kinds == {"sd3"} else "flux"
        tiny = add_node(prompt, "DreamIDTest_TinyDiT", {"kind": kind, "init_seed": init_seed})
        if replace_links(prompt, (loader, 0), (tiny, 0)):
            made[loader] = tiny
    return made


def strip_meta(prompt: dict, object_info: dict | None = None) -> dict:
    """``{id: (class_type, inputs)}`` for comparing two prompts (titles and key order ignored).
    With ``object_info``, only the inputs a node's definition declares are kept: what the server
    reads. Frontends differ in the display-only widgets their extensions add and send along
    (1.27 sends PreviewAny's ``preview`` text, 1.49 does not); the server ignores those."""
    out = {}
    for k, v in prompt.items():
        inputs = copy.deepcopy(v["inputs"])
        if object_info is not None and v["class_type"] in object_info:
            spec = object_info[v["class_type"]].get("input", {})
            declared = {name for section in ("required", "optional") for name in (spec.get(section) or {})}
            inputs = {name: value for name, value in inputs.items() if name in declared}
        out[str(k)] = (v["class_type"], inputs)
    return out
