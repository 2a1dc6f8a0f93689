// DreamIdentity: show what a node reports ({"ui": {"text": [...]}}) on the node itself.
// ComfyUI's frontend keeps a node's "ui" output but draws no "text" of its own (frontend 1.4x shows none),
// so the learn summary, where a file was saved, EncodeFace's used/skipped photos and the common-word
// warning would be invisible. One read-only text box per node, replaced on every run, on both frontends
// (public API only: app.registerExtension, onExecuted, addDOMWidget).
import { app } from "../../scripts/app.js";

const WIDGET = "dreamid_report";

function showReport(node, lines) {
  const text = (Array.isArray(lines) ? lines : [lines]).map(String).join("\n");
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const el = document.createElement("textarea");
    el.readOnly = true;
    el.className = "dreamid-report comfy-multiline-input";
    el.dataset.dreamidReport = String(node.id);
    el.style.cssText = "width:100%;min-height:3.2em;font-size:11px;opacity:0.9;resize:none;";
    widget = node.addDOMWidget(WIDGET, "dreamid_report", el, {
      getValue: () => el.value,
      setValue: (v) => { el.value = v ?? ""; },
      serialize: false,
    });
    widget.serialize = false;  // not part of the prompt nor of widgets_values
  }
  widget.element.value = text;
  widget.element.title = text;
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
