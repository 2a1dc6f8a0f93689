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
