// DreamIdentity: show what a node reports ({"ui": {"text": [...]}}) on the node itself.
// ComfyUI's frontend keeps a node's "ui" output but draws no "text" of its own (frontend 1.4x shows none),
// so the learn summary, where a file was saved, EncodeFace's used/skipped photos and the common-word
// warning would be invisible. One read-only text box per node, replaced on every run, on both frontends
// (public API only: app.registerExtension, onExecuted, addDOMWidget). Checked in Chromium on frontends
// 1.27 and 1.49 by tests/test_node_reports.py.
import { app } from "../../scripts/app.js";

const WIDGET = "dreamid_report";
const FONT_PX = 11;
const LINE_PX = 14;  // line height of FONT_PX monospace text
const CHAR_PX = 7;  // advance of one FONT_PX monospace character, rounded up
const MAX_LINES = 4;  // a longer report scrolls: the node grows by at most this many lines
const MARGIN_PX = 4;  // the frontend insets a DOM widget's element by this much on every side

// Lines the text takes in a box as wide as the node: wrapped at spaces, a word longer than a line
// broken (as a textarea does).
function wrappedLines(text, nodeWidth) {
  const perLine = Math.max(16, Math.floor((nodeWidth - 2 * MARGIN_PX - 12) / CHAR_PX));
  let lines = 0;
  for (const line of text.split("\n")) {
    let used = 0;  // characters on the current line
    lines += 1;
    for (const word of line.split(" ")) {
      const need = used ? used + 1 + word.length : word.length;
      if (need <= perLine) { used = need; continue; }
      const extra = Math.ceil(word.length / perLine) - (used ? 0 : 1);
      lines += extra;
      used = word.length % perLine || perLine;
    }
  }
  return lines;
}

function reportHeight(node, el) {
  return Math.min(MAX_LINES, wrappedLines(el.value, node.size[0])) * LINE_PX + 8 + 2 * MARGIN_PX;
}

function showReport(node, lines) {
  const text = (Array.isArray(lines) ? lines : [lines]).map(String).join("\n");
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget && !text) return;  // nothing said and nothing to replace
  if (!widget) {
    const el = document.createElement("textarea");
    el.readOnly = true;
    el.className = "dreamid-report comfy-multiline-input";
    el.dataset.dreamidReport = String(node.id);
    el.style.cssText = `width:100%;font-size:${FONT_PX}px;line-height:${LINE_PX}px;opacity:0.9;resize:none;`;
    widget = node.addDOMWidget(WIDGET, "dreamid_report", el, {
      getValue: () => el.value,
      setValue: (v) => { el.value = v ?? ""; },
      getMinHeight: () => reportHeight(node, el),
      getMaxHeight: () => reportHeight(node, el),
      margin: MARGIN_PX,
      serialize: false,
    });
    widget.serialize = false;  // not part of the prompt nor of widgets_values
  }
  widget.element.value = text;
  widget.element.title = text;
  // grow the node when the text needs more room than it has; never shrink what the user sized
  const needed = node.computeSize?.();
  if (needed && needed[1] > node.size[1]) node.setSize([node.size[0], needed[1]]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "DreamIdentity.NodeReports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("DreamID_")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showReport(this, message.text);
    };
  },
});
