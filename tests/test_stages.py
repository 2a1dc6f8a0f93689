"""dreamid_core.learning.stages: which per-stage token pair a cross-attention call uses."""

from __future__ import annotations

import pytest

from dreamid_core.learning.stages import (
    UNET_LAYOUTS,
    UNetLayout,
    layout_from_unet_config,
    level_of_block,
    stage_for_block,
    stage_for_level,
    stage_for_timestep,
)


def test_time_stages_are_equal_bins_over_the_training_timesteps():
    stages = [stage_for_timestep(t, 5) for t in range(1000)]
    assert [stages.count(s) for s in range(5)] == [200] * 5
    assert stages == sorted(stages)  # monotone: stage 0 = least noisy end
    assert stage_for_timestep(199.9, 5) == 0 and stage_for_timestep(200, 5) == 1
    assert stage_for_timestep(-3, 5) == 0 and stage_for_timestep(5000, 5) == 4  # clamped
    assert {stage_for_timestep(t, 1) for t in range(0, 1000, 37)} == {0}
    assert stage_for_timestep(10, 4, num_timesteps=20) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_time_stage_refuses_non_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        stage_for_timestep(bad, 5)


def test_stage_count_must_be_positive():
    with pytest.raises(ValueError, match="num_stages"):
        stage_for_timestep(3, 0)


def test_sdxl_blocks_map_one_unit_per_stage():
    # SDXL attends at levels 1 and 2: input 4,5 (l1) 7,8 (l2), middle, output 0-2 (l2), 3-5 (l1)
    got = {b: stage_for_block(b, 5, "sdxl") for b in
           [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
            ("output", 0), ("output", 2), ("output", 3), ("output", 5)]}
    assert got == {("input", 4): 0, ("input", 5): 0, ("input", 7): 1, ("input", 8): 1, ("middle", 0): 2,
                   ("output", 0): 3, ("output", 2): 3, ("output", 3): 4, ("output", 5): 4}


def test_sd2_blocks_follow_execution_order():
    blocks = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", j) for j in range(3, 12)]
    stages = [stage_for_block(b, 7, "sd2") for b in blocks]
    assert stages == sorted(stages) and stages[0] == 0 and stages[-1] == 6
    assert len(set(stages)) == 7  # 7 attention units, 7 stages: one each
    assert level_of_block(("output", 11), "sd2") == ("output", 0)
    assert level_of_block(("input", 7), "sd2") == ("input", 2)


def test_layout_from_comfy_unet_configs():
    sdxl = layout_from_unet_config({"channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
                                    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10})
    assert sdxl == UNET_LAYOUTS["sdxl"]
    tiny = layout_from_unet_config({"channel_mult": [1], "num_res_blocks": [1], "transformer_depth": [1],
                                    "transformer_depth_middle": 1})
    assert tiny == UNetLayout(num_levels=1, num_res_blocks=1, attention_levels=(0,))
    # tiny one-level UNet: input 1, middle, output 0 and 1 -> units in, mid, out
    assert [stage_for_block(b, 3, tiny) for b in [("input", 1), ("middle", 0), ("output", 0), ("output", 1)]] \
        == [0, 1, 2, 2]


def test_diffusers_style_levels_agree_with_comfy_blocks():
    # diffusers up_blocks[i] is output level num_levels - 1 - i
    for i, j in [(1, 3), (2, 6), (3, 9)]:
        assert stage_for_level("output", 3 - i, 5, "sd1") == stage_for_block(("output", j), 5, "sd1")
    with pytest.raises(ValueError, match="part"):
        stage_for_level("decoder", 0, 5, "sd1")
    with pytest.raises(ValueError, match="family"):
        stage_for_block(("input", 1), 5, "flux")
