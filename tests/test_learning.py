"""dreamid_core.learning's pure parts: the loss in the model's own space, inits, word pairing, settings,
photo batches, recomputed encodings and frozen-weight aliases (the learner itself runs on both hosts in
test_learn_identity.py, test_learn_nodes.py, test_learn_lean.py and test_learn_contract.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreamid_core.errors import ConfigError
from dreamid_core.identities.learned_identity import IdentityConfig
from dreamid_core.learning import (
    Encoded,
    LearnSettingsError,
    PhotoSet,
    RunOptions,
    check_settings,
    encode_recomputed,
    from_word_rows,
    pair_words,
    prediction_error,
    prediction_loss,
    start_tensors,
    step_generator,
)
from dreamid_core.learning.frozen import FrozenWeights, frozen_alias, input_grad_only


def _draws(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("seed", range(5))
def test_eps_loss_is_the_noise_mse_of_textual_inversion(seed):
    x0, noise, eps_pred = _draws(seed)
    sigma = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 14 + 0.03
    s = sigma[:, None, None, None]
    x_t = x0 + noise * s
    denoised = x_t - eps_pred * s  # ComfyUI's EPS.calculate_denoised
    torch.testing.assert_close(prediction_loss("eps", x0, denoised, sigma), torch.mean((eps_pred - noise) ** 2),
                               rtol=1e-5, atol=1e-6)
    assert float(prediction_loss("eps", x0, x0, sigma)) == 0.0  # a perfect model


@pytest.mark.parametrize("seed", range(5))
def test_v_loss_is_the_velocity_mse(seed):
    x0, noise, v_pred = _draws(seed)
    sigma = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 14 + 0.03
    s = sigma[:, None, None, None]
    alpha, sig_vp = 1 / torch.sqrt(1 + s * s), s / torch.sqrt(1 + s * s)  # VP coefficients
    x_t = x0 + noise * s
    x_in = x_t * alpha
    v = alpha * noise - sig_vp * x0  # the velocity target (diffusers' get_velocity)
    denoised = x_in * alpha - v_pred * sig_vp  # ComfyUI's V_PREDICTION.calculate_denoised
    torch.testing.assert_close(prediction_loss("v", x0, denoised, sigma), torch.mean((v_pred - v) ** 2),
                               rtol=1e-4, atol=1e-5)
    # the noise-space error is alpha * the velocity error: it would weight noisy steps down by alpha^2
    eps_err = prediction_error("eps", x0, denoised, sigma)
    torch.testing.assert_close(eps_err, alpha * (v_pred - v), rtol=1e-4, atol=1e-5)


def test_flow_loss_is_the_flow_velocity_mse():
    x0, noise, v_pred = _draws(1)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    denoised = x_t - s * v_pred  # ComfyUI's CONST.calculate_denoised
    torch.testing.assert_close(prediction_loss("flow", x0, denoised, sigma), torch.mean((v_pred - (noise - x0)) ** 2),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prediction kind"):
        prediction_loss("x0", x0, denoised, sigma)


def test_word_init_rule():
    rows = {"clip_l": torch.arange(6.0).reshape(3, 2)}
    assert torch.equal(from_word_rows(rows, 3)["clip_l"], rows["clip_l"])  # k tokens: its own rows
    assert torch.equal(from_word_rows(rows, 2)["clip_l"], torch.tensor([[2.0, 3.0], [2.0, 3.0]]))  # else the mean
    assert torch.equal(from_word_rows({"clip_l": rows["clip_l"][:1]}, 2)["clip_l"], rows["clip_l"][[0, 0]])
    with pytest.raises(ValueError):
        from_word_rows({"clip_l": torch.zeros(0, 2)}, 2)


def test_start_tensors_for_each_layout():
    words = {"clip_l": torch.randn(2, 8)}
    staged = start_tensors("per_stage", words, k=2, num_stages=3)["clip_l"]
    assert staged.shape == (3, 2, 2, 8) and all(torch.equal(staged[s, kv], words["clip_l"]) for s in range(3)
                                                 for kv in range(2))
    assert torch.equal(start_tensors("per_stage", {"clip_l": staged}, k=2, num_stages=3)["clip_l"], staged)
    with pytest.raises(ConfigError, match="cannot start a words identity"):
        start_tensors("words", {"clip_l": staged}, k=2, num_stages=3)
    with pytest.raises(ConfigError, match="3 stages but num_stages is 5"):
        start_tensors("per_stage", {"clip_l": staged}, k=2, num_stages=5)
    with pytest.raises(ConfigError, match="holds 2 token"):
        start_tensors("words", words, k=3, num_stages=1)


def _enc(ids, positions):
    words = tuple((i, t) for i, t in enumerate(ids) if i > 0 and i not in positions)
    return Encoded(torch.zeros(1, len(ids), 4), None, tuple(positions), words)


def test_words_are_paired_by_token_not_by_position():
    # [SOT a photo of S1 S2 , smiling]  vs  [SOT a photo of person , smiling]
    ident = _enc([0, 10, 11, 12, -1, -1, 13, 14], [4, 5])
    ref = _enc([0, 10, 11, 12, 99, 13, 14], [4])
    assert pair_words(ident, ref) == ((1, 1), (2, 2), (3, 3), (6, 5), (7, 6))
    two = _enc([0, 10, 99, 98, 13], [2, 3])  # a two-token class word
    assert pair_words(_enc([0, 10, -1, 13], [2]), two) == ((1, 1), (3, 4))
    # words that tokenize differently around the identity: no pairs rather than wrong ones
    assert pair_words(_enc([0, 10, -1, 15], [2]), _enc([0, 10, 99, 13], [2]), "t") == ()


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps=0"), (dict(lr=float("nan")), "learning_rate=NaN"),
                                       (dict(lr=-1.0), "learning_rate"), (dict(attn_weight=float("inf")), "attention"),
                                       (dict(resolution=100), "resolution=100 .* multiple of 8")])
def test_bad_settings_are_named(kw, match):
    cfg = IdentityConfig(**({"steps": 10} | kw))
    with pytest.raises(LearnSettingsError, match=match) as info:
        check_settings(cfg, RunOptions())
    assert isinstance(info.value, ConfigError)


def test_model_resolution_rule_and_options():
    check_settings(IdentityConfig(steps=1, resolution=512), RunOptions(), resolution_multiple=64)
    with pytest.raises(LearnSettingsError, match="resolution=520 must be a positive multiple of 64"):
        check_settings(IdentityConfig(steps=1, resolution=520), RunOptions(), resolution_multiple=64)
    for opts, match in [(RunOptions(batch_size=0), "batch_size=0"), (RunOptions(scale_jitter=0.6), "scale_jitter"),
                        (RunOptions(attn_terms=(1.0, -1.0, 1.0)), "attn_terms"),
                        (RunOptions(max_queries=0), "max_queries")]:
        with pytest.raises(LearnSettingsError, match=match):
            check_settings(IdentityConfig(steps=1), opts)


def _photos(n=3):
    g = torch.Generator().manual_seed(0)
    marks = np.array([[3.0, 3.0], [5.0, 3.0], [4.0, 4.0], [3.2, 5.0], [4.8, 5.0]])
    return PhotoSet(torch.randn(n, 4, 8, 8, generator=g), [(2.0, 2.0, 6.0, 6.5)] * n, [marks] * n, 64)


def test_batches_depend_on_the_step_alone():
    photos = _photos()
    a = photos.draw(step_generator(0, 7), 2)
    photos.draw(step_generator(0, 3), 2)  # another step in between changes nothing
    b = photos.draw(step_generator(0, 7), 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = photos.draw(step_generator(1, 7), 2)
    assert not torch.equal(a[0], c[0])
    lat, masks = photos.fixed([0, 2])
    assert torch.equal(lat, photos.latents[[0, 2]]) and masks.shape == (2, 8, 8)
    assert float(masks[0, 4, 4]) > 0.9 and float(masks[0, 0, 0]) < 0.1  # inside / outside the face


def test_recomputed_encoding_gives_the_same_gradient_and_keeps_no_activations():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)]).requires_grad_(False)

    class Host:
        def encode(self, prompt, vectors):
            h = vectors["clip_l"]
            for lin in layers:
                h = torch.tanh(lin(h))
            return Encoded(h[None], None, (1,), ())

    v = torch.randn(3, 16, requires_grad=True)
    direct = Host().encode("p", {"clip_l": v}).context.square().sum()
    (g_direct,) = torch.autograd.grad(direct, v)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        enc = encode_recomputed(Host(), "p", {"clip_l": v})
    assert enc.positions == (1,) and enc.pooled is None
    assert all(t is v for t in saved)  # only the input: every activation is recomputed in backward
    (g_re,) = torch.autograd.grad(enc.context.square().sum(), v)
    assert torch.equal(g_re, g_direct)


def test_frozen_aliases_share_storage_and_never_get_gradients():
    with torch.inference_mode():
        lin = torch.nn.Linear(4, 3)  # parameters made under inference mode: inference tensors
        norm = torch.nn.LayerNorm(3)
    assert lin.weight.is_inference() and lin.weight.requires_grad
    originals = [lin.weight, lin.bias, norm.weight, norm.bias]
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        norm(lin(x)).sum().backward()
    with FrozenWeights([lin, norm]) as frozen:
        assert frozen.copied_bytes == 0 and frozen.count == 4
        assert lin.weight.data_ptr() == originals[0].data_ptr() and not lin.weight.requires_grad
        norm(lin(x)).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in originals)
    assert [lin.weight, lin.bias, norm.weight, norm.bias] == originals  # the same objects are back
    alias, copied = frozen_alias(originals[0])
    assert not copied and not alias.is_inference() and torch.equal(alias, originals[0])


def test_input_grad_only_matches_autograd_for_linear_and_conv():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).requires_grad_(False)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).requires_grad_(False)
    for layer, x, kind in [(lin, torch.randn(2, 7, 6), ("linear",)),
                           (conv, torch.randn(2, 3, 9, 9), ("conv2d", conv.stride, conv.padding, conv.dilation, 1))]:
        x = x.requires_grad_(True)
        (g_ref,) = torch.autograd.grad(layer(x).sin().sum(), x)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, _s=saved: _s.append(t) or t, lambda t: t):
            y = input_grad_only(x, layer, lambda g, _l=layer: _l.weight, kind)
        assert not saved  # neither the weight nor the input is kept
        (g,) = torch.autograd.grad(y.sin().sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(g.sum()))
