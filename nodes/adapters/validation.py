"""Input checks shared by the nodes, for values ComfyUI's own validation lets through.

ComfyUI checks a FLOAT widget against its min/max, but NaN compares false with both, so a prompt
sent through the API with ``"strength": NaN`` reaches the node unchanged (and e.g. makes a black
image). Every FLOAT input is passed through :func:`require_finite` first.
"""

from __future__ import annotations

import math

from ...dreamid_core.errors import DreamIDError


class NodeInputError(DreamIDError, ValueError):
    """A node input whose value cannot be used (NaN, infinity, not a number)."""


def _show(value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def require_finite(node_name: str, **floats: object) -> None:
    """Raise :class:`NodeInputError` naming the first input (keyword name) that is not a finite number.

    ``require_finite("DreamID_EncodeFace", strength=strength)``
    """
    for name, value in floats.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise NodeInputError(
                f"{node_name}: {name}={_show(value)} is not a finite number. Set {name} to a real number "
                "(in the UI, or in the API prompt's inputs); NaN and infinity are not accepted.")
