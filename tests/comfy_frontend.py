"""The ComfyUI frontend in a Playwright page, as a person sees it (tests only).

Frontends differ in how they tell the user about a problem with a loaded workflow, so this module
looks for every kind it knows and reports what is on screen, instead of pinning one version's UI:

- frontend 1.2x (ComfyUI 0.3.6x): a PrimeVue dialog (``.p-dialog``, "Some Nodes Are Missing"
  listing the types) or a toast (``.p-toast-message``, e.g. a workflow schema alert);
- frontend 1.4x (ComfyUI 0.33): an error overlay (``[data-testid=error-overlay]``: "Missing node:
  <type>", or "N errors found" when there are several) whose "View details" button opens the
  errors tab of the properties panel (``[data-testid=properties-panel]``), which names every
  missing node type and model.

Both frontends mark a node whose type is unknown with ``has_errors`` in ``app.graph``.
"""

from __future__ import annotations

import re
import time

# the frontend's checks after loadGraphData are asynchronous: wait this long before reading the
# screen. test_browser_flags_missing_node_types reads a missing node type's notice after the same wait,
# so an empty report after it is evidence, not a race.
SETTLE_MS = 1500
NOTICE_SELECTORS = (".p-dialog", ".p-toast-message", "[data-testid=error-overlay]")
DETAILS_BUTTON = "[data-testid=error-overlay-see-errors]"
DETAILS_PANEL = "[data-testid=properties-panel]"


def open_app(page, url: str) -> float:
    """Open the frontend at ``url``; seconds until ``app.graph`` exists."""
    t0 = time.monotonic()
    page.goto(url + "/")
    page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady !== false",
                           timeout=60_000)
    return time.monotonic() - t0


def frontend_version(page) -> str:
    """The frontend's own version string (both 1.2x and 1.4x set it on window), or "unknown"."""
    return page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")


def notices(page) -> list[str]:
    """The visible text of every dialog, toast and error overlay on the page."""
    return page.evaluate("""(selectors) => [...document.querySelectorAll(selectors.join(','))]
        .filter(el => el.offsetParent !== null || el.getClientRects().length > 0)
        .map(el => el.innerText.trim()).filter(Boolean)""", list(NOTICE_SELECTORS))


def error_details(page) -> str:
    """What the error overlay's "View details" shows (frontend 1.4x), or "" when there is no overlay."""
    button = page.locator(DETAILS_BUTTON)
    if button.count() == 0 or not button.first.is_visible():
        return ""
    button.first.click()
    panel = page.locator(DETAILS_PANEL)
    panel.first.wait_for(state="visible", timeout=10_000)
    page.wait_for_timeout(300)
    return panel.first.inner_text()


def dismiss_notices(page) -> None:
    """Close dialogs, toasts and the error overlay so the next workflow starts with a clean screen."""
    page.keyboard.press("Escape")
    page.evaluate("""() => document.querySelectorAll(
        '.p-dialog-close-button, .p-toast-close-button, [data-testid=error-overlay-dismiss]').forEach(b => b.click())""")
    page.wait_for_timeout(200)


def load_in_app(page, workflow: dict, settle_ms: int = SETTLE_MS) -> dict:
    """``app.loadGraphData(workflow)``, wait ``settle_ms``, then report what the user sees:
    ``errors`` (types of nodes marked has_errors), ``types`` (all node types), ``notices``
    (texts of dialogs, toasts, the error overlay) and ``missing_nodes`` (a notice, or the overlay's
    details, says a node is missing; the text that says so is kept in ``missing_text``)."""
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(settle_ms)
    state = page.evaluate("""() => ({
        errors: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
        types: app.graph.nodes.map(n => n.type)})""")
    state["notices"] = notices(page)
    said = [t for t in state["notices"] if re.search(r"missing", t, re.I) and re.search(r"\bnodes?\b", t, re.I)]
    if not said and state["notices"]:  # "N errors found": the details say which
        details = error_details(page)
        if re.search(r"missing node", details, re.I):
            said = [details]
    state["missing_nodes"] = bool(said)
    state["missing_text"] = "\n".join(said)
    return state


# -- the graph as the app holds it: node boxes, overlaps ---------------------------------------------

_BOXES_JS = """() => app.graph.nodes.map(n => {
    const title = n.constructor.title_mode === LiteGraph.NO_TITLE ? 0 : LiteGraph.NODE_TITLE_HEIGHT;
    const box = typeof n.getBounding === "function" ? Array.from(n.getBounding())
        : [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title];
    return {id: String(n.id), type: n.type, title: n.title, box: box.map(Number)};
})"""


def node_boxes(page) -> list[dict]:
    """Every node of ``app.graph`` with its box ``[x, y, w, h]`` in graph units, title bar included
    (``LGraphNode.getBounding()``): ``{id, type, title, box}``."""
    return page.evaluate(_BOXES_JS)


def overlaps(boxes: list[dict], ignore: set[str] = frozenset()) -> list[str]:
    """Each pair of boxes that share an area, as "title (id) x title (id): w x h": the size of the
    shared rectangle. Boxes whose id is in ``ignore`` are left out."""
    found = []
    kept = [b for b in boxes if b["id"] not in ignore]
    for i, a in enumerate(kept):
        ax, ay, aw, ah = a["box"]
        for b in kept[i + 1:]:
            bx, by, bw, bh = b["box"]
            w = min(ax + aw, bx + bw) - max(ax, bx)
            h = min(ay + ah, by + bh) - max(ay, by)
            if w > 0 and h > 0:
                found.append(f"{a['title']!r} ({a['id']}) x {b['title']!r} ({b['id']}): {w:.0f} x {h:.0f}")
    return found


def fit_view(page, settle_ms: int = 300) -> None:
    """Zoom and pan the canvas so every node is in view (for screenshots)."""
    page.evaluate("""() => {
        const b = app.graph.nodes.map(n => n.getBounding());
        const x0 = Math.min(...b.map(r => r[0])), y0 = Math.min(...b.map(r => r[1]));
        const x1 = Math.max(...b.map(r => r[0] + r[2])), y1 = Math.max(...b.map(r => r[1] + r[3]));
        app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.95});
        app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(settle_ms)


def screenshot_graph(page, path, size: tuple[int, int] = (2600, 1500)) -> None:
    """A screenshot of the whole graph in a viewport of ``size`` (large enough that the canvas draws
    text and DOM widgets, which both frontends hide when zoomed far out); the viewport is restored."""
    before = page.viewport_size
    page.set_viewport_size({"width": size[0], "height": size[1]})
    try:
        page.wait_for_timeout(300)  # the canvas follows the window's size
        fit_view(page)
        page.screenshot(path=str(path))
    finally:
        page.set_viewport_size(before)
        page.wait_for_timeout(300)


def wait_for_stable_boxes(page, quiet_ms: int = 600, timeout_ms: int = 15_000) -> list[dict]:
    """Draw the canvas until no node box changes for ``quiet_ms`` (images that finish loading and
    widgets added by a run resize nodes over a few frames); returns the boxes."""
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while True:
        page.evaluate("() => { app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true); }")
        boxes = node_boxes(page)
        if boxes != last:
            last, since = boxes, time.monotonic()
        elif (time.monotonic() - since) * 1000 >= quiet_ms:
            return boxes
        if (time.monotonic() - t0) * 1000 > timeout_ms:
            raise TimeoutError(f"node boxes still changing after {timeout_ms} ms: {boxes}")
        page.wait_for_timeout(100)


# -- editing and running the loaded graph from the page ----------------------------------------------

_TINY_CLIP_JS = """({type, rules}) => {
    const g = app.graph, added = [];
    const link = (id) => g.links.get?.(id) ?? g.links[id];
    const left = Math.min(...g.nodes.map(n => n.pos[0]));
    const dual = g.nodes.find(n => n.type === "DualCLIPLoader");
    const ditKind = dual?.widgets?.find(w => w.name === "type")?.value === "sd3" ? "sd3" : "flux";
    for (const rule of rules) {
        for (const loader of g.nodes.filter(n => n.type === rule.loader)) {
            const slot = loader.outputs.findIndex(o => o.type === rule.output);
            const targets = [...(loader.outputs[slot]?.links ?? [])].map(link).filter(Boolean)
                .map(l => [g.getNodeById(l.target_id), l.target_slot]);
            if (!targets.length) continue;
            const tinyType = rule.tiny ?? type;
            const tiny = LiteGraph.createNode(tinyType);
            if (!tiny) throw new Error(`${tinyType} is not a registered node type`);
            const kind = rule.kindWidget ? loader.widgets.find(w => w.name === rule.kindWidget)?.value
                       : rule.dit ? ditKind : null;
            const kindWidget = tiny.widgets?.find(w => w.name === "kind");
            if (kind && kindWidget) kindWidget.value = kind;
            tiny.pos = [left - tiny.size[0] - 400, loader.pos[1]];
            g.add(tiny);
            for (const [node, s] of targets) tiny.connect(0, node, s);
            added.push(String(tiny.id));
        }
    }
    return added;
}"""
#: which loader outputs the tiny test nodes stand in for: a checkpoint's CLIP (tiny checkpoints hold
#: none), a DualCLIPLoader's CLIP (its "type" picks the kind) and a UNETLoader's FLUX.1 / SD3 MODEL
TINY_RULES = [{"loader": "CheckpointLoaderSimple", "output": "CLIP"},
              {"loader": "DualCLIPLoader", "output": "CLIP", "tiny": "DreamIDTest_TinyCLIP", "kindWidget": "type"},
              {"loader": "UNETLoader", "output": "MODEL", "tiny": "DreamIDTest_TinyDiT", "dit": True}]

_SET_WIDGETS_JS = r"""(values) => {
    const g = app.graph, link = (id) => g.links.get?.(id) ?? g.links[id];
    const changed = [];
    for (const [key, named] of Object.entries(values)) {  // key: a node type, or one node's id
        const nodes = /^\d+$/.test(key) ? [g.getNodeById(Number(key)) ?? g.getNodeById(key)].filter(Boolean)
                                        : g.nodes.filter(n => n.type === key);
        if (/^\d+$/.test(key) && !nodes.length) throw new Error(`no node ${key}`);
        for (const node of nodes) {
            const type = node.type;
            for (const [name, value] of Object.entries(named)) {
                let target = node, widget = node.widgets?.find(w => w.name === name);
                const input = node.inputs?.find(i => i.name === name);
                if (input?.link != null) {  // fed by a value node (PrimitiveInt ...): set that node's value
                    target = g.getNodeById(link(input.link).origin_id);
                    widget = target.widgets?.[0];
                }
                if (!widget) throw new Error(`node ${node.id} (${type}) has no widget ${name}`);
                widget.value = value;
                widget.callback?.(value);
                changed.push(`${target.id}.${widget.name}=${value}`);
            }
        }
    }
    return changed;
}"""

_RUN_JS = """async ({timeoutMs, fresh}) => {
    const { api } = await import("/scripts/api.js");
    if (fresh) {  // the server forgets cached results (its worker resets on waking), so every node runs
        await api.fetchApi("/free", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify({free_memory: true})});
        await new Promise(r => setTimeout(r, 500));
    }
    const events = [], handlers = [];
    const listen = (type) => { const h = (e) => events.push([type, e.detail]);
                                api.addEventListener(type, h); handlers.push([type, h]); };
    ["executed", "execution_success", "execution_error", "execution_interrupted"].forEach(listen);
    const queue = api.queuePrompt, t0 = performance.now();
    let queued = null, rejected = null;
    api.queuePrompt = async function (...args) {  // keep the server's answer: the prompt id or its errors
        try { return queued = await queue.apply(this, args); } catch (e) { rejected = e; throw e; }
    };
    try { await app.queuePrompt(0, 1); } catch (e) { rejected ??= e; } finally { api.queuePrompt = queue; }
    const finish = (status, error = null) => {
        handlers.forEach(([type, h]) => api.removeEventListener(type, h));
        const executed = {};
        for (const [type, d] of events)
            if (type === "executed" && d.prompt_id === queued?.prompt_id) executed[d.node] = d.output;
        return {status, error, prompt_id: queued?.prompt_id ?? null, executed, seconds: (performance.now() - t0) / 1000};
    };
    if (!queued?.prompt_id)
        return finish("rejected", rejected ? (rejected.response ?? String(rejected)) : "app.queuePrompt queued nothing");
    while (performance.now() - t0 < timeoutMs) {
        const end = events.find(([type, d]) => type !== "executed" && d.prompt_id === queued.prompt_id);
        if (end) return finish(end[0].replace("execution_", ""), end[0] === "execution_success" ? null : end[1]);
        await new Promise(r => setTimeout(r, 100));
    }
    return finish("timeout");
}"""


def use_tiny_clip_in_app(page, node_type: str = "DreamIDTest_TinyCLIP") -> list[str]:
    """Feed every consumer of a CheckpointLoaderSimple's CLIP from a new ``node_type`` node, and of a
    DualCLIPLoader's CLIP / UNETLoader's MODEL from the tiny FLUX.1 / SD3 test nodes (:data:`TINY_RULES`),
    added with the graph API left of the graph; returns the new ids."""
    return page.evaluate(_TINY_CLIP_JS, {"type": node_type, "rules": TINY_RULES})


def set_widgets_in_app(page, values: dict[str, dict]) -> list[str]:
    """``{node type or node id: {widget: value}}`` on every node of that type (or that one node); an
    input fed by a value node (PrimitiveInt ...) sets that node's value instead. Returns
    "node.widget=value" for each change."""
    return page.evaluate(_SET_WIDGETS_JS, values)


def run_in_app(page, timeout_s: float = 240, fresh: bool = True) -> dict:
    """Queue the loaded graph as the Run button does (``app.queuePrompt``) and wait for the API's
    execution_success / execution_error / execution_interrupted events of that prompt. Returns
    ``{status: success|error|interrupted|rejected|timeout, error, prompt_id, executed, seconds}``,
    ``executed`` holding each node's ``ui`` output ({node id: {"text": [...], "images": [...]}}).
    ``fresh``: first ask the server to drop its cache (POST /free), so an identical earlier prompt
    (another test's) cannot answer for this one."""
    return page.evaluate(_RUN_JS, {"timeoutMs": timeout_s * 1000, "fresh": fresh})


# -- what a node shows: DOM widgets (the pack's report box, a note's text) ------------------------

REPORT_WIDGET = "dreamid_report"  # web/js/dreamid_text.js

_WIDGET_JS = """async ({id, widgetName}) => {
    const node = app.graph.getNodeById(id) ?? app.graph.getNodeById(Number(id));
    const widget = node?.widgets?.find(w => widgetName ? w.name === widgetName : w.element);
    if (!widget?.element) return null;
    const canvas = app.canvas;
    canvas.ds.scale = 1;  // the node on screen at 100 %, where the frontend draws DOM widgets
    canvas.centerOnNode(node);
    canvas.setDirty(true, true);
    for (let i = 0; i < 4; i++) { canvas.draw(true, true); await new Promise(r => requestAnimationFrame(r)); }
    const el = widget.element, rect = el.getBoundingClientRect(), c = canvas.canvas.getBoundingClientRect();
    const [x, y, w, h] = node.getBounding();
    const [sx, sy] = canvas.ds.convertOffsetToCanvas([x, y]);
    const style = getComputedStyle(el);
    const overflow = Math.max(0, ...[el, ...el.querySelectorAll("*")].map(e => e.scrollHeight - e.clientHeight));
    return {text: String(el.value ?? widget.value ?? ""), shown: el.innerText ?? "", overflow,
            visible: rect.width > 0 && rect.height > 0 && style.display !== "none"
                     && style.visibility !== "hidden" && Number(style.opacity) > 0.2,
            element: [rect.x, rect.y, rect.width, rect.height],
            node: [c.x + sx, c.y + sy, w * canvas.ds.scale, h * canvas.ds.scale]};
}"""


def dom_widget_on_screen(page, node_id: str, widget_name: str | None = None) -> dict | None:
    """Brings node ``node_id`` on screen at 100 % and reads its DOM widget ``widget_name`` (the first
    DOM widget when None): ``{text, shown, overflow, visible, element, node}`` (``text`` its value,
    ``shown`` the element's rendered text, ``overflow`` how many px of it need scrolling, element and
    node as screen rectangles ``[x, y, w, h]``), or None when the node has no such widget."""
    return page.evaluate(_WIDGET_JS, {"id": str(node_id), "widgetName": widget_name})


def report_on_node(page, node_id: str) -> dict | None:
    """The pack's report box on node ``node_id`` (see :func:`dom_widget_on_screen`), or None."""
    return dom_widget_on_screen(page, node_id, REPORT_WIDGET)
