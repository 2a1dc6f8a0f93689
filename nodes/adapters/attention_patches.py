"""ComfyUI attention patches of the pack, set on a MODEL clone through the patch API (never a forward).

- :class:`PerStagePatch` (``set_model_attn2_patch``): for the batch chunks that are the positive
  (``extra_options["cond_or_uncond"] == 0``), swaps ``context_attn2`` / ``value_attn2`` for the stage's
  key / value prompt encodings (length repeated like ComfyUI's own cond batching, dtype and device of the
  context it replaces). The stage comes from the step's sigma (``stage_kind="time"``) or the UNet block
  (``"unet"``), through ``dreamid_core.stages``.
- :class:`TrainKV` (``set_model_attn2_patch``, identity learning): every cross-attention of the batch
  reads the learner's key / value contexts: ``[1, B, L, C]`` (one per row, for every layer) or
  ``[S, B, L, C]`` (each layer its UNet block's stage); nothing while none are set.
- :class:`AttentionRecorder` (``set_model_attn2_replace`` on every cross-attention block): while
  ``recording``, layers with at most ``max_queries`` queries compute ``softmax(q k^T) v`` explicitly with
  ``dreamid_core.learning.attention_loss`` and keep the probability maps (while ``collecting``), for
  the attention loss and face mass; every other call is ComfyUI's own ``optimized_attention``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_sampling
import torch

from ...dreamid_core.learning.attention_loss import attention_output, attention_probs
from ...dreamid_core.learning.stages import UNetLayout, layout_from_unet_config, stage_for_block, stage_for_timestep

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher


def attention_blocks(model_patcher: ModelPatcher) -> list[tuple[str, int]]:
    """ComfyUI block ids (``("input", 1)``, ``("middle", 0)``, ``("output", 3)``) holding cross-attention."""
    dm = model_patcher.model.diffusion_model

    def has_attn(module: torch.nn.Module) -> bool:
        return any(getattr(m, "attn2", None) is not None for m in module.modules())

    blocks = [("input", i) for i, b in enumerate(dm.input_blocks) if has_attn(b)]
    if getattr(dm, "middle_block", None) is not None and has_attn(dm.middle_block):
        blocks.append(("middle", 0))
    blocks += [("output", i) for i, b in enumerate(dm.output_blocks) if has_attn(b)]
    if not blocks:
        raise ValueError(f"{type(dm).__name__} has no cross-attention blocks; DreamIdentity needs an SD1.x, SD2.x "
                         "or SDXL UNet")
    return blocks


def unet_layout(model_patcher: ModelPatcher) -> UNetLayout:
    return layout_from_unet_config(model_patcher.model.model_config.unet_config)


def unused_unet_stages(model_patcher: ModelPatcher, num_stages: int) -> list[int]:
    """Stages no cross-attention block maps to under ``stage_kind="unet"`` (more stages than UNet units)."""
    layout = unet_layout(model_patcher)
    used = {stage_for_block(b, num_stages, layout) for b in attention_blocks(model_patcher)}
    return [s for s in range(num_stages) if s not in used]


def stage_selector(model_patcher: ModelPatcher, num_stages: int, stage_kind: str) -> Callable[[dict, int], int]:
    """``select(extra_options, row) -> stage`` for the chunk that starts at batch row ``row``."""
    if stage_kind == "unet":
        layout = unet_layout(model_patcher)
        return lambda extra, row: stage_for_block(tuple(extra["block"][:2]), num_stages, layout)
    of_sigma = stage_of_sigma(model_patcher, num_stages)

    def by_time(extra: dict, row: int) -> int:
        sigmas = extra.get("sigmas")
        if sigmas is None:
            raise RuntimeError("the per-stage patch got no sigma from ComfyUI (transformer_options['sigmas'])")
        return of_sigma(sigmas[min(row, sigmas.shape[0] - 1)])

    return by_time


def stage_of_sigma(model_patcher: ModelPatcher, num_stages: int) -> Callable[[torch.Tensor], int]:
    """``stage(sigma) -> int``: the time stage of a sampler's sigma, on the same scale the learner draws its
    training timesteps from (an index into the model's sigma table, ``stage_for_timestep`` over its length).
    Discrete (eps / v) models: ``model_sampling.timestep`` is that index. Flow models (FLUX.1, SD3) feed
    their blocks the shifted sigma itself, so the index is where sigma falls in the (increasing) table."""
    sampling = model_patcher.get_model_object("model_sampling")
    table = sampling.sigmas.detach().float().cpu()
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    cache: dict[float, int] = {}

    def stage(sigma: torch.Tensor) -> int:
        key = float(sigma)
        if key not in cache:
            if flow:
                index = float(torch.searchsorted(table, torch.tensor([key]), right=False)[0].clamp_max(len(table) - 1))
            else:
                index = float(sampling.timestep(sigma.reshape(1).float()))
            cache[key] = stage_for_timestep(index, num_stages, len(table))
        return cache[key]

    return stage


def fit_context(ctx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``ctx [1 or n, l, C]`` shaped as ``like [n, L, C]``: repeated along the tokens (L a multiple of l,
    as ComfyUI's CONDCrossAttn.concat pads), on ``like``'s device and dtype."""
    n, length, width = like.shape
    if ctx.shape[-1] != width:
        raise ValueError(f"per-stage context is {ctx.shape[-1]} wide but the model's context is {width} wide; use "
                         "an identity made for this model family")
    if length != ctx.shape[1]:
        if length % ctx.shape[1]:
            raise ValueError(f"per-stage context of {ctx.shape[1]} tokens cannot fill a {length}-token context")
        ctx = ctx.repeat(1, length // ctx.shape[1], 1)
    return ctx.to(device=like.device, dtype=like.dtype).expand(n, -1, -1)


class PerStagePatch:
    """attn2_patch: cond chunks get the stage's key / value contexts (see the module docstring)."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 select: Callable[[dict, int], int]) -> None:
        if len(keys) != len(values) or not keys:
            raise ValueError(f"need one key and one value context per stage, got {len(keys)} and {len(values)}")
        self.keys, self.values, self.select = list(keys), list(values), select

    def __call__(self, n: torch.Tensor, context_attn2: torch.Tensor, value_attn2: torch.Tensor | None,
                 extra_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        kinds = list(extra_options.get("cond_or_uncond") or [0])
        if 0 not in kinds:
            return n, context_attn2, value_attn2
        value_attn2 = context_attn2 if value_attn2 is None else value_attn2
        chunk = context_attn2.shape[0] // len(kinds)
        ks, vs = list(context_attn2.split(chunk)), list(value_attn2.split(chunk))
        for i, kind in enumerate(kinds):
            if kind == 0:
                stage = self.select(extra_options, i * chunk)
                ks[i], vs[i] = fit_context(self.keys[stage], ks[i]), fit_context(self.values[stage], vs[i])
        return n, torch.cat(ks), torch.cat(vs)


class TrainKV:
    """attn2_patch: the learner's per-stage key / value contexts (see the module docstring)."""

    def __init__(self, model_patcher: ModelPatcher) -> None:
        self.layout = unet_layout(model_patcher)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def set(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        self.keys, self.values = keys, values

    def clear(self) -> None:
        self.keys = self.values = None

    def __call__(self, n: torch.Tensor, context_attn2: torch.Tensor, value_attn2: torch.Tensor | None,
                 extra_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.keys is None:
            return n, context_attn2, value_attn2
        s = 0 if self.keys.shape[0] == 1 else stage_for_block(tuple(extra_options["block"][:2]), self.keys.shape[0],
                                                              self.layout)
        return n, fit_context(self.keys[s], context_attn2), fit_context(self.values[s], context_attn2)


class AttentionRecorder:
    """attn2_replace: explicit attention maps while recording, ComfyUI's attention otherwise."""

    def __init__(self, max_queries: int | None = 1024) -> None:
        self.max_queries = max_queries
        self.recording = False  # compute the recorded layers explicitly (kept through a checkpoint recompute)
        self.collecting = False  # and keep their maps
        self.maps: list[torch.Tensor] = []  # [B, heads, HW, T] per recorded layer call

    def start(self, record: bool) -> None:
        self.maps = []
        self.recording = self.collecting = bool(record)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
        heads = extra_options["n_heads"]
        if self.recording and (self.max_queries is None or q.shape[1] <= self.max_queries):
            probs = attention_probs(q, k, heads)  # [B, heads, HW, T] float32
            if self.collecting:
                self.maps.append(probs)
            return attention_output(probs, v, heads)
        return comfy_attention.optimized_attention(q, k, v, heads)

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


def add_recorder(model_patcher: ModelPatcher, recorder: AttentionRecorder) -> None:
    for block_name, number in attention_blocks(model_patcher):
        model_patcher.set_model_attn2_replace(recorder, block_name, number)
