// DreamIdentity: the folder of the encoder file in the frontend's missing-model list.
// Frontend 1.4x lists a missing model under the folder it knows for the loader node; it knows none for
// DreamID_LoadIDEncoder and says "Unknown". It also reads a node's `properties.models` entries
// ({name, directory, url}) and takes the folder from the one named like the widget's file. The encoder
// has no public download, so the entry has no url: 1.4x then offers no download for it, but frontend
// 1.2x rejects a workflow whose saved entry lacks a url ("Invalid workflow against zod schema").
// So the entry lives only on the live node, never in a saved workflow: a non-enumerable getter on
// node.properties (JSON serialisation skips it) that always names the widget's current file.
// Public API only (app.registerExtension, nodeCreated). Tested by tests/test_template_layout.py.
import { app } from "../../scripts/app.js";

const LOADER = "DreamID_LoadIDEncoder";
const WIDGET = "encoder_name";
const FOLDER = "dreamidentity";  // the model folder the pack registers (ENCODER_FOLDER in nodes/adapters/paths.py)

app.registerExtension({
  name: "DreamIdentity.EncoderFolder",
  nodeCreated(node) {
    if (node.comfyClass !== LOADER && node.type !== LOADER) return;
    const props = (node.properties ??= {});
    let saved = [];  // entries a workflow brought along (kept, and saved again, as they were)
    Object.defineProperty(props, "models", {
      configurable: true,
      enumerable: false,
      get() {
        const name = node.widgets?.find((w) => w.name === WIDGET)?.value;
        const ours = typeof name === "string" && name.endsWith(".safetensors") &&
          !saved.some((m) => m?.name === name) ? [{ name, directory: FOLDER }] : [];
        return [...saved, ...ours];
      },
      set(value) { saved = Array.isArray(value) ? value : []; },
    });
    const onSerialize = node.onSerialize;
    node.onSerialize = function (data) {
      onSerialize?.apply(this, arguments);
      if (saved.length) (data.properties ??= {}).models = saved;
    };
  },
});
