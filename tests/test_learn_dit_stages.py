"""Per-stage identities on the diffusion transformers (FLUX.1, SD3) inside a real ComfyUI (in-process, CPU):
their joint attention reads the stage's key prompt and value prompt as two text streams.

What is checked: the two-stream attention against an explicit float64 formula written here (every row's keys
and values); with keys = values = the words' prompt, the model's output, the recorded maps and a KSampler's
image are the words path's bit for bit; the stage a sampler's sigma picks is the stage the learner trained
at that timestep; the node learns key and value vectors of every encoder (the loss falls, MODEL and CLIP come
back bit for bit, checkpointing + offloading learn the same vectors with the attention loss on); and stages
by UNet block are refused on these transformers by name."""

from __future__ import annotations

import pytest
import test_learn_dit
import torch
from test_learn_dit import KINDS, PARTS, RES, build, learn
from test_learn_nodes import no_grads, state_hash

pytestmark = [pytest.mark.comfyui]
pack = test_learn_dit.pack  # the same module fixture: the pack loaded into the in-process ComfyUI


@pytest.fixture(scope="module")
def dits(comfyui):
    return {kind: build(kind) for kind in KINDS}


# -- the attention -------------------------------------------------------------------------------------

def _reference(q, k, v, L, heads):
    """The two-stream rule in float64, row by row: [key stream; value stream; image] queries."""
    b, n, inner = q.shape
    d = inner // heads
    split = [t.double().reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v)]
    qh, kh, vh = split
    T = 2 * L
    img = list(range(T, n))
    plans = [(range(0, L), list(range(0, L)) + img, list(range(0, L)) + img),
             (range(L, T), list(range(L, T)) + img, list(range(L, T)) + img),
             (range(T, n), list(range(0, L)) + img, list(range(L, T)) + img)]
    out = torch.empty(b, heads, n, d, dtype=torch.float64)
    maps = None
    for rows, key_rows, value_rows in plans:
        rows = list(rows)
        p = torch.softmax(qh[:, :, rows] @ kh[:, :, key_rows].transpose(-1, -2) / d ** 0.5, dim=-1)
        out[:, :, rows] = p @ vh[:, :, value_rows]
        maps = p[..., :L]  # the image rows' probabilities on the key stream's text
    return out.transpose(1, 2).reshape(b, n, inner), maps


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("record", [False, True])
def test_two_text_streams_follow_the_rule_row_by_row(comfyui, pack, skip, record):
    import comfy.ldm.modules.attention as attention

    joint_mod = pack["mods"]("nodes.adapters.joint_attention")
    g = torch.Generator().manual_seed(5)
    heads, d = 3, 8
    for L, N in ((4, 9), (7, 16), (1, 2)):
        n = 2 * L + N
        q, k, v = (torch.randn(2, n, heads * d, generator=g) for _ in range(3))
        want, want_maps = _reference(q, k, v, L, heads)
        joint = joint_mod.JointAttention(max_queries=None)
        joint.start(record, txt_len=2 * L, img_len=N, prior=None, stream_len=L)
        args = [t.reshape(2, n, heads, d).transpose(1, 2) for t in (q, k, v)] if skip else [q, k, v]
        got = joint(attention.optimized_attention, *args, heads, skip_reshape=skip)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert joint.calls == 1
        maps = joint.take()
        if record:
            torch.testing.assert_close(maps[0].double(), want_maps, rtol=1e-5, atol=1e-6)
        else:
            assert maps == []
        # another pack's override (e.g. SageAttention) serves every sub-call
        served: list[int] = []

        def prior(f, *a, _served=served, _dim=2 if skip else 1, **kw):
            _served.append(a[0].shape[_dim])
            return f(*a, **kw)

        joint.start(record, txt_len=2 * L, img_len=N, stream_len=L, prior=prior)
        again = joint(attention.optimized_attention, *args, heads, skip_reshape=skip)
        assert torch.equal(again, got) and served == [L, L] + ([] if record else [N])
        joint.start(record, txt_len=2 * L, img_len=N, prior=None, stream_len=L)
        # a call of another length (SD3.5's image-only self-attention) is ComfyUI's own, untouched
        other = [t[:, :, :N] if skip else t[:, :N] for t in args]
        assert torch.equal(joint(attention.optimized_attention, *other, heads, skip_reshape=skip),
                           attention.optimized_attention(*other, heads, skip_reshape=skip))
        assert joint.calls == 0  # not a two-stream call


@pytest.mark.parametrize("kind", KINDS)
def test_equal_streams_are_the_words_path_bit_for_bit(comfyui, pack, dits, kind):
    """keys = values = the words prompt: the same output (and maps) as one stream, recorded or not."""
    host_mod = pack["mods"]("nodes.adapters.learn_host")
    core = pack["mods"]("dreamid_core.learning")
    m = dits[kind]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode(False), torch.no_grad(), host_mod.ComfyHost(m["model"], m["clip"]) as host:
        rows = host.word_embeddings("person")
        enc = host.encode("a photo of S* at the beach", {k: v[:1].repeat(2, 1) for k, v in rows.items()})
        x0 = torch.randn(2, 16, 8, 8, generator=g)
        noised = host.noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([host.num_timesteps // 3, 7]))
        context = enc.context.repeat(2, 1, 1)
        pooled = enc.pooled.repeat(2, 1)
        words = core.Conditioning(context, pooled)
        staged = core.Conditioning(context, pooled, context[None], context[None].clone())
        for record in (False, True):
            plain, plain_maps = host.denoise(noised, words, record=record)
            two, two_maps = host.denoise(noised, staged, record=record)
            assert torch.equal(two, plain)
            assert len(two_maps) == len(plain_maps) == (0 if not record else {"flux": 4, "sd3": 2}[kind])
            assert all(torch.equal(a, b) for a, b in zip(two_maps, plain_maps, strict=True))
        # other values, the same keys: the image changes; the first layer's map (where the identity acts, from
        # the keys alone) does not, the later ones see an image stream the values changed
        values = host.encode("a photo of S* at the beach", {k: v[1:2].repeat(2, 1) * 3 for k, v in rows.items()})
        other = core.Conditioning(context, pooled, context[None], values.context.repeat(2, 1, 1)[None])
        changed, changed_maps = host.denoise(noised, other, record=True)
        assert not torch.allclose(changed, plain)
        assert torch.equal(changed_maps[0], plain_maps[0]) and not torch.equal(changed_maps[-1], plain_maps[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_the_sampler_reads_the_stage_the_learner_trained_at_that_timestep(comfyui, pack, dits, kind):
    stages = pack["mods"]("dreamid_core.learning.stages")
    patches = pack["mods"]("nodes.adapters.attention_patches")
    model = dits[kind]["model"]
    sigmas = model.get_model_object("model_sampling").sigmas
    g = torch.Generator().manual_seed(2)
    for S in (1, 2, 3, 5, 7):
        of_sigma = patches.stage_of_sigma(model, S)
        ts = torch.cat([torch.randint(0, len(sigmas), (200,), generator=g), torch.tensor([0, len(sigmas) - 1])])
        for t in ts.tolist():
            assert of_sigma(sigmas[t]) == stages.stage_for_timestep(t, S, len(sigmas)), (S, t)
        assert of_sigma(torch.tensor(1.0)) == S - 1  # a sampler's first step, pure noise: the last stage


def _staged(pack, kind, key_rows, value_rows, S=2):
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    parts = {k: torch.stack([torch.stack([key_rows[k], value_rows[k]])] * S) for k in key_rows}
    return li.LearnedIdentity(li.IdentityConfig(layout="per_stage", num_stages=S, target=kind), parts)


@pytest.mark.parametrize("kind", KINDS)
def test_a_per_stage_identity_samples_like_its_words_when_its_stages_are_the_words(comfyui, pack, dits, kind):
    from test_learn_nodes import encode

    m = dits[kind]
    model, clip = m["model"], m["clip"]
    host_mod = pack["mods"]("nodes.adapters.learn_host")
    with torch.inference_mode(False), torch.no_grad(), host_mod.ComfyHost(model, clip) as host:
        rows = {k: v[:1].repeat(2, 1) for k, v in host.word_embeddings("person").items()}
    other = {k: v * 1.5 + 0.1 for k, v in rows.items()}
    embeds = pack["mods"]("dreamid_core.identities.embeds").IdentityEmbeds(parts=rows)
    text, cfg = "a photo of S* in a garden", {"flux": 1.0, "sd3": 4.5}[kind]
    neg = encode(comfyui, clip, "blurry")
    apply = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply
    with torch.inference_mode():
        injected = pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, "S*")["result"][0]
        staged_model, positive = apply(model, clip, _staged(pack, kind, rows, rows), text, "S*")
        valued_model, valued_positive = apply(model, clip, _staged(pack, kind, rows, other), text, "S*")

    def sample(mp, pos):
        latent = {"samples": torch.zeros(1, 16, RES // 8, RES // 8)}
        with torch.inference_mode():
            return comfyui.nodes.KSampler().sample(mp, 3, 3, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]

    reference = sample(model, injected)
    assert torch.equal(sample(staged_model, positive), reference)
    assert "model_function_wrapper" not in model.model_options
    # a wrapper another node set before keeps running around the call
    seen = []

    def prior(apply_model, args):
        seen.append(args["c"]["c_crossattn"].shape[1])
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(prior)
    with torch.inference_mode():
        wrapped_staged, positive = apply(wrapped, clip, _staged(pack, kind, rows, rows), text, "S*")
    assert torch.equal(sample(wrapped_staged, positive), reference)
    assert len(seen) == 3 and set(seen) == {2 * injected[0][0].shape[1]}  # 3 steps, the two streams inside
    assert not torch.equal(sample(valued_model, valued_positive), reference)  # the values are read


@pytest.mark.parametrize("kind", KINDS)
def test_learning_per_stage_moves_keys_and_values_and_leaves_the_models(comfyui, pack, dits, kind):
    m = dits[kind]
    before = state_hash(m["model"].model.diffusion_model), state_hash(m["clip"].cond_stage_model)
    out = learn(pack, m, steps=8, layout="per_stage", num_stages=2, preview_every=8 if kind == "flux" else 0)
    ident = out["result"][0]
    if kind == "flux":  # the preview sampled the identity through ApplyPerStageIdentity's path
        assert out["result"][3].shape[0] == 1 and float(out["result"][3].std()) > 0
    assert ident.layout == "per_stage"
    assert {k: tuple(v.shape) for k, v in ident.tensors.items()} == {k: (2, 2, 2, w) for k, w in PARTS[kind].items()}
    extra = ident.config.extra
    assert extra["final_diffusion_loss"] < extra["initial_diffusion_loss"], extra
    for key, t in ident.tensors.items():  # the start is one vector for every stage, key and value
        moved = (t - t[:1, :1]).flatten(2).abs().amax(-1) > 1e-3  # [S, 2]
        if kind == "flux" and key == "clip_l":  # FLUX reads CLIP-L only pooled: the last stage's keys
            assert moved.tolist() == [[False, False], [True, False]], (key, moved)
        else:  # the text the joint attention reads: keys and values
            assert moved[:, 0].any() and moved[:, 1].any(), (key, moved)
    assert (state_hash(m["model"].model.diffusion_model), state_hash(m["clip"].cond_stage_model)) == before
    assert no_grads(m["model"].model.diffusion_model) and no_grads(m["clip"].cond_stage_model)
    # the preview path and ApplyPerStageIdentity take it
    with torch.inference_mode():
        staged, positive = pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(m["model"], m["clip"], ident,
                                                                                   "a photo of S*", "S*")
    assert "model_function_wrapper" in staged.model_options


def test_per_stage_checkpointed_and_offloaded_learn_the_same_vectors(comfyui, pack, dits):
    runs = [learn(pack, dits["flux"], layout="per_stage", num_stages=2, attention_loss_weight=0.5,
                  gradient_checkpointing=ckpt, offload=ckpt)["result"][0].tensors for ckpt in (False, True)]
    for key in runs[0]:
        assert float((runs[0][key] - runs[1][key]).abs().max()) < 1e-5, key


def test_stages_by_unet_block_are_refused_on_a_transformer(comfyui, pack, dits):
    err = pack["mods"]("nodes.adapters.validation").NodeInputError
    with pytest.raises(err, match=r"stage_kind 'unet' stages by UNet block, and FLUX\.1 is a transformer.*"
                                  r"use stage_kind 'time'"):
        learn(pack, dits["flux"], layout="per_stage", stage_kind="unet")
    li = pack["mods"]("dreamid_core.identities.learned_identity")
    parts = {k: torch.zeros(2, 2, 2, w) for k, w in PARTS["sd3"].items()}
    by_block = li.LearnedIdentity(li.IdentityConfig(layout="per_stage", num_stages=2, stage_kind="unet",
                                                    target="sd3"), parts)
    with pytest.raises(Exception, match=r"stages are by 'unet'.*SD3/3\.5 has no UNet blocks.*stage_kind 'time'"):
        pack["nodes"]["DreamID_ApplyPerStageIdentity"]().apply(dits["sd3"]["model"], dits["sd3"]["clip"], by_block,
                                                               "a photo of S*", "S*")
