"""dreamid_core.learning: the pure maths of one identity-learning step."""

from __future__ import annotations

import pytest
import torch

from dreamid_core.learning import (
    LearnSettingsError,
    check_learn_settings,
    context_pairs,
    noise_prediction_loss,
    sample_timesteps,
    tile_tokens,
)


def test_noise_loss_is_eps_mse_for_an_eps_model():
    g = torch.Generator().manual_seed(0)
    x0, noise, eps_pred = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.5, 3.0])
    x_t = x0 + noise * sigma[:, None, None, None]
    denoised = x_t - eps_pred * sigma[:, None, None, None]  # what ComfyUI's EPS.calculate_denoised returns
    assert torch.allclose(noise_prediction_loss(x_t, denoised, noise, sigma), torch.mean((eps_pred - noise) ** 2))
    assert float(noise_prediction_loss(x_t, x0, noise, sigma)) < 1e-10  # a perfect model


def test_tile_tokens_and_timesteps():
    v = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(tile_tokens(v, 3), v[[0, 1, 0]])
    assert torch.equal(tile_tokens(v[:1], 2), v[[0, 0]])
    with pytest.raises(ValueError):
        tile_tokens(torch.zeros(0, 3), 2)
    t = sample_timesteps(torch.Generator().manual_seed(1), 500)
    assert t.min() >= 0 and t.max() <= 999 and len(set(t.tolist())) > 300


def test_context_pairs_match_words_around_the_identity():
    # prompt: [SOT a photo of S1 S2 , smiling EOT]   reference: [SOT a photo of person , smiling EOT]
    pairs = context_pairs([4, 5], [4], end=8, ref_end=7)
    assert pairs == [(1, 1), (2, 2), (3, 3), (6, 5), (7, 6), (8, 7)]
    assert context_pairs([1], [1, 2], end=3, ref_end=4) == [(2, 3), (3, 4)]  # 2-token class word


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps"), (dict(lr=float("nan")), "learning_rate"),
                                       (dict(lr=-1.0), "learning_rate"), (dict(attn_weight=float("inf")), "attention"),
                                       (dict(batch=0), "batch"), (dict(resolution=100), "resolution")])
def test_bad_settings_are_named(kw, match):
    args = dict(steps=10, lr=0.005, attn_weight=0.003, batch=1, resolution=512) | kw
    with pytest.raises(LearnSettingsError, match=match):
        check_learn_settings(**args)
