"""ComfyUI entry point of the DreamIdentity pack.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS (the classic node API,
loaded by every ComfyUI since 2023). The model code lives in ``dreamid_core`` (pure torch);
``nodes`` holds the thin ComfyUI adapters.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

#: the pack's frontend extension: what a node reports ({"ui": {"text": ...}}) shown on the node
WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
