"""A diffusers cross-attention processor that (a) feeds per-stage key and value contexts and (b)
records attention probabilities for the face-wise attention loss.

One :class:`IdentityAttention` holds the state every processor of one UNet reads:

- ``kv``: ``(keys [S, N, L, C], values [S, N, L, C])`` prompt encodings per stage — the key
  projection of cross-attention reads ``keys[stage]``, the value projection ``values[stage]``,
  instead of the UNet's ``encoder_hidden_states``. None: the ordinary context (words layout).
- the stage of each call: ``stage_kind="time"`` — per batch row from the timestep the UNet is
  called with (a forward pre-hook on the UNet, :func:`dreamid_core.learning.stages.stage_for_timestep`);
  ``"unet"`` — per layer from its block (``down_blocks[i]`` -> ("input", i), ``mid_block`` ->
  ("middle", 0), ``up_blocks[i]`` -> ("output", levels - 1 - i), :func:`stage_for_level`).
- ``record()``: while active each cross-attention layer appends ``(name, probs)`` to ``records``,
  ``probs [N, heads, HW, L]`` the softmax of its query-key scores (float32, with gradients), and
  computes its output from them (only layers with at most ``max_queries`` queries). Set
  ``collecting = False`` before ``backward()`` under gradient checkpointing: the recomputed forward then
  computes the same way without recording twice.

Without ``kv`` and without recording the processor computes exactly what diffusers'
``AttnProcessor2_0`` computes (same operations, same order), so installing it changes no bit;
with every stage's keys and values equal to one context it equals that context's output bit for
bit as well (the per-stage == words test).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dreamid_core.learning.stages import STAGE_KINDS, UNetLayout, stage_for_level, stage_for_timestep

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def unet_layout(unet) -> UNetLayout:
    """The stage layout of a diffusers UNet2DConditionModel, from its config."""
    cfg = unet.config
    levels = len(cfg.block_out_channels)
    attends = tuple(i for i, kind in enumerate(cfg.down_block_types) if "CrossAttn" in kind)
    res = cfg.layers_per_block
    res = int(res[0] if isinstance(res, (list, tuple)) else res)
    middle = "CrossAttn" in str(cfg.mid_block_type or "")
    return UNetLayout(num_levels=levels, num_res_blocks=res, attention_levels=attends, has_middle_attention=middle)


def block_of(name: str, num_levels: int) -> tuple[str, int]:
    """Processor name (``up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``) -> (part, level)."""
    m = _BLOCK.match(name)
    if m is None:
        raise ValueError(f"cannot tell the UNet block of attention layer {name!r}")
    if m.group(3):
        return "middle", 0
    index = int(m.group(2))
    return ("input", index) if m.group(1) == "down_blocks" else ("output", num_levels - 1 - index)


@dataclass
class IdentityAttention:
    """State shared by the cross-attention processors of one UNet (see the module docstring)."""

    num_stages: int = 1
    stage_kind: str = "time"
    num_timesteps: int = 1000
    kv: tuple[torch.Tensor, torch.Tensor] | None = None
    row_stages: torch.Tensor | None = None  # [N] long, set per UNet call (time stages)
    max_queries: int | None = None  # record only layers with at most this many queries (None: all)
    recording: bool = False  # compute probabilities explicitly (and keep doing so in a checkpoint recompute)
    collecting: bool = False  # append them to ``records``
    records: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stage_kind not in STAGE_KINDS:
            raise ValueError(f"stage_kind must be one of {STAGE_KINDS}, got {self.stage_kind!r}")

    def set_timesteps(self, timestep: torch.Tensor | float | int, batch: int) -> None:
        t = torch.as_tensor(timestep).flatten().detach().to("cpu", torch.float64)
        if t.numel() == 1:
            t = t.expand(batch)
        self.row_stages = torch.tensor([stage_for_timestep(float(v), self.num_stages, self.num_timesteps)
                                        for v in t.tolist()], dtype=torch.long)

    @contextmanager
    def record(self):
        """Record every cross-attention layer's probabilities while active; ``records`` is cleared first."""
        self.records.clear()
        self.recording = self.collecting = True
        try:
            yield self.records
        finally:
            self.recording = self.collecting = False

    @contextmanager
    def contexts(self, keys: torch.Tensor, values: torch.Tensor):
        """Per-stage key / value contexts ``[S, N, L, C]`` while active."""
        if keys.shape != values.shape or keys.ndim != 4:
            raise ValueError(f"key and value contexts must both be [S, N, L, C], got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        before, self.kv = self.kv, (keys, values)
        try:
            yield
        finally:
            self.kv = before

    def contexts_for(self, layer_stage: int | None, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv
        if keys.shape[1] != batch:
            raise ValueError(f"per-stage contexts hold {keys.shape[1]} prompts but the UNet runs a batch of {batch}; "
                             "build them for the batch the UNet sees (with classifier-free guidance: negative "
                             "rows first, then the identity prompts)")
        if keys.shape[0] == 1:
            return keys[0], values[0]
        if layer_stage is not None:
            return keys[layer_stage], values[layer_stage]
        if self.row_stages is None or self.row_stages.numel() != batch:
            raise RuntimeError("time stages need the UNet's timestep: install the processors with install()")
        rows = self.row_stages.to(keys.device)
        index = torch.arange(batch, device=keys.device)
        return keys[rows, index], values[rows, index]  # [N, L, C] each


class IdentityAttnProcessor:
    """Cross-attention (attn2) processor reading :class:`IdentityAttention`."""

    def __init__(self, state: IdentityAttention, name: str, layer_stage: int | None) -> None:
        self.state, self.name, self.layer_stage = state, name, layer_stage

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        state = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attention_mask is not None:
            length = state.kv[0].shape[2] if state.kv is not None else (
                hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if state.kv is not None:
            key_ctx, value_ctx = state.contexts_for(self.layer_stage, batch_size, hidden_states.device)
            key_ctx, value_ctx = key_ctx.to(hidden_states.dtype), value_ctx.to(hidden_states.dtype)
            if attn.norm_cross:
                key_ctx, value_ctx = attn.norm_encoder_hidden_states(key_ctx), attn.norm_encoder_hidden_states(value_ctx)
        elif encoder_hidden_states is None:
            key_ctx = value_ctx = hidden_states
        else:
            key_ctx = value_ctx = (attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross
                                   else encoder_hidden_states)
        key = attn.to_k(key_ctx)
        value = attn.to_v(value_ctx)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [N, h, HW, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [N, h, L, d]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if state.recording and (state.max_queries is None or query.shape[2] <= state.max_queries):
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # [N, h, HW, L]
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)
            if state.collecting:
                state.records.append((self.name, probs))
            hidden_states = torch.matmul(probs.to(value.dtype), value)  # [N, h, HW, d]
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                           is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install(unet, *, num_stages: int = 1, stage_kind: str = "time",
            num_timesteps: int = 1000) -> tuple[IdentityAttention, Callable[[], None]]:
    """Put :class:`IdentityAttnProcessor` on every cross-attention layer of ``unet`` (self-attention
    keeps its processor). Returns the shared state and an ``uninstall()`` that restores everything.
    ``num_timesteps``: the model's training timesteps (the scheduler's ``num_train_timesteps``)."""
    state = IdentityAttention(num_stages=num_stages, stage_kind=stage_kind, num_timesteps=num_timesteps)
    before = dict(unet.attn_processors)
    layout = unet_layout(unet)
    procs = {}
    for name, proc in before.items():
        if ".attn2." not in name:
            procs[name] = proc
            continue
        layer_stage = None
        if stage_kind == "unet":
            part, level = block_of(name, layout.num_levels)
            layer_stage = stage_for_level(part, level, num_stages, layout)
        procs[name] = IdentityAttnProcessor(state, name.removesuffix(".processor"), layer_stage)
    unet.set_attn_processor(procs)

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        state.set_timesteps(timestep, sample.shape[0])

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def uninstall() -> None:
        handle.remove()
        unet.set_attn_processor(before)

    return state, uninstall
