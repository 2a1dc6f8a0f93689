"""The diffusion loss of identity learning, in the model's own prediction space, from its denoised output.

API
- ``PREDICTIONS = ("eps", "v", "flow")``.
- ``prediction_error(kind, x0, denoised, sigma) -> [B, ...]``: the error of the model's prediction in
  the space it was trained in, computed from what every host has: the clean latents ``x0``, the
  model's denoised estimate ``D`` and the noise level ``sigma`` (``x_t = x0 + sigma * noise`` for
  eps/v models in ComfyUI's sigma space; ``x_t = (1 - sigma) * x0 + sigma * noise`` for flow models):

      eps:  eps_pred - eps   = (x0 - D) / sigma
      v:    v_pred - v       = (x0 - D) * sqrt(1 + sigma^2) / sigma
      flow: v_pred - v       = (x0 - D) / sigma           (v = noise - x0, D = x_t - sigma * v_pred)

- ``prediction_loss(kind, x0, denoised, sigma) -> scalar``: the mean square of that error.

Why the model's own space (decided once for both hosts): for an eps model it is textual inversion's
loss exactly. For a v-prediction model (SD 2.x-768) the noise-space error is ``alpha * (v_pred - v)``
with ``alpha^2 = 1 / (1 + sigma^2)``, so a noise-space loss would weight the noisiest timesteps, which
decide layout and identity, by 0.005 (SD2 at t = 999) against ~1 at the clean end; the velocity
loss is what the model was trained with and keeps every timestep's weight.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v", "flow")


def prediction_error(kind: str, x0: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The prediction error in the model's space (see the module docstring), float32."""
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction kind must be one of {PREDICTIONS}, got {kind!r}")
    s = sigma.float().reshape(-1, *([1] * (x0.ndim - 1)))  # [B, 1, 1, 1]
    err = (x0.float() - denoised.float()) / s
    if kind == "v":
        err = err * torch.sqrt(1.0 + s * s)
    return err


def prediction_loss(kind: str, x0: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return prediction_error(kind, x0, denoised, sigma).square().mean()
