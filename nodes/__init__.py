"""ComfyUI node classes of the pack (thin adapters over dreamid_core)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
