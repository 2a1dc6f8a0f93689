"""The trigger contract, in a real ComfyUI: for EVERY prompt, DreamID_InjectIDTokens(prompt) is exactly
(torch.equal, cond and pooled) what CLIPTextEncode gives for the same prompt with each trigger replaced
by ``embedding:NAME``, NAME being the file DreamID_SaveIDEmbedding wrote from the same S*.

Checked on seeded generated prompts for SD1, SD2 and SDXL: punctuation, quotes and brackets on either
side, possessives, weights, nested brackets, BREAK, several occurrences and triggers, other embeddings,
trigger positions sweeping across the 77-token chunk boundaries, prompts of 1–300 words, k = 1, 2, 3
and 9 (a group long enough for ComfyUI to split it), custom triggers in any letter case.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from comfy_env import load_pack

pytestmark = pytest.mark.comfyui
PACK = Path(__file__).resolve().parents[1]
KEYS = {"sd1": ("l",), "sd2": ("h",), "sdxl": ("l", "g")}
WORDS = ("a photo of the portrait woman man smiling garden detailed face light soft cinematic oil painting "
         "wearing hat chef city night rain blue red golden hour bokeh sharp focus studio BREAK 4k").split()
BEFORE = ["", "", "", "(", "((", "[", '"', "'", "“", "<", "{", ",", "-", "…"]
AFTER = ["", "", "", ",", ".", "!", "?", ";", ":", "'s", "’s", '"', "'", ")", "]", "…", ">", "-", ",,", "*"]


@pytest.fixture(scope="module")
def pack(comfyui):
    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_EncodeFace"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "identity": sys.modules[f"{root}.dreamid_core.identities.embeds"],
            "errors": sys.modules[f"{root}.dreamid_core.errors"]}


@pytest.fixture(scope="module")
def emb_dir(comfyui):
    return comfyui.models_dir("embeddings")


def tiny(kind, emb_dir):
    from comfy_tiny import tiny_clip

    return tiny_clip(kind, embedding_directory=str(emb_dir), dtype=torch.float32)  # fp16 on a CPU is slow


def width(clip, key):
    return getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings().weight.shape[1]


def random_identity(pack, clip, kind, k, seed):
    g = torch.Generator().manual_seed(seed)
    parts = {f"clip_{key}": torch.randn(k, width(clip, key), generator=g) * 0.2 for key in KEYS[kind]}
    return pack["identity"].IdentityEmbeds(parts=parts, info={"target": kind})


def save(pack, embeds, name):
    out = pack["nodes"]["DreamID_SaveIDEmbedding"]().save(embeds, name, True)
    return out["result"][0]  # "embedding:NAME"


def inject(pack, clip, embeds, text, trigger="S*", **extra):
    return pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, text, trigger, **extra)["result"][0]


def assert_same(a, b, prompt):
    assert len(a) == len(b), prompt
    for (ca, da), (cb, db) in zip(a, b, strict=True):
        assert ca.shape == cb.shape, (prompt, ca.shape, cb.shape)
        assert torch.equal(ca, cb), (prompt, (ca - cb).abs().max())
        pa, pb = da.get("pooled_output"), db.get("pooled_output")
        assert (pa is None) == (pb is None), prompt
        if pa is not None:
            assert torch.equal(pa, pb), prompt


def occurrence(rng: random.Random, word: str) -> list[str]:
    """One written occurrence of a trigger as [text before, TRIGGER, text after]; rng picks the style."""
    style = rng.random()
    shown = word if rng.random() < 0.7 else rng.choice([word.lower(), word.upper()])
    if style < 0.15:
        return [f"({'' if rng.random() < 0.5 else 'a portrait of '}", shown,
                f"{rng.choice(['', ' smiling'])}:{rng.choice(['1.3', '0.8', '1.05'])})"]
    if style < 0.22:
        return ["((", shown, "))"]
    if style < 0.27:
        return ["[(", shown, ":1.2)]"]
    return [rng.choice(BEFORE), shown, rng.choice(AFTER)]


def generate(rng: random.Random, triggers: list[str], n_words: int, n_occ: int) -> list[tuple[bool, str]]:
    """A prompt as pieces ``(is_trigger, text)``: words with trigger occurrences cut in at random places."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    cuts = sorted(rng.sample(range(n_words + 1), min(n_occ, n_words + 1)))
    pieces: list[tuple[bool, str]] = []
    last = 0
    for cut in cuts:
        before, trigger, after = occurrence(rng, rng.choice(triggers))
        pieces += [(False, " ".join(words[last:cut]) + " " + before), (True, trigger), (False, after + " ")]
        last = cut
    pieces.append((False, " ".join(words[last:]) + rng.choice(["", ".", ", masterpiece"])))
    return pieces


def render(pieces: list[tuple[bool, str]], replace) -> str:
    return "".join(replace(text) if is_trigger else text for is_trigger, text in pieces)


CASES = {  # kind -> (seed, number of prompts)
    "sd1": (1, 120), "sd2": (2, 120), "sdxl": (3, 80),
}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_inject_equals_embedding_name_on_generated_prompts(comfyui, pack, emb_dir, kind):
    seed, n = CASES[kind]
    rng = random.Random(seed)
    clip = tiny(kind, emb_dir)
    encode = comfyui.nodes.CLIPTextEncode().encode
    identities = {}
    for k in (1, 2, 3, 9):
        embeds = random_identity(pack, clip, kind, k, seed * 10 + k)
        identities[k] = (embeds, save(pack, embeds, f"contract {kind} k{k}"))
    other = save(pack, random_identity(pack, clip, kind, 3, 99), f"other {kind}")
    checked = 0
    for i in range(n):
        k = (1, 2, 3, 9)[i % 4]
        embeds, token = identities[k]
        trigger = rng.choice(["S*", "S*", "sks", "ohwx", "<me>", "S1*"])
        n_words = rng.choice([1, 3, 8, 20, 60, 72, 73, 74, 75, 76, 120, 148, 150, 220, 300])
        pieces = generate(rng, [trigger], n_words, rng.choice([1, 1, 2, 3]))
        if rng.random() < 0.15:  # another embedding in the same prompt, handled by ComfyUI itself
            pieces.append((False, f" {other} detail"))
        prompt = render(pieces, lambda w: w)
        reference = render(pieces, lambda w, token=token: f" {token} ")
        assert_same(inject(pack, clip, embeds, prompt, trigger), encode(clip, reference)[0], prompt)
        checked += 1
    assert checked == n


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("before", [73, 74, 75, 76, 148, 149, 150])
def test_trigger_at_the_chunk_boundary_followed_by_text(comfyui, pack, emb_dir, kind, before):
    """S* after exactly 74 words followed by more text: 3 chunks, as ComfyUI itself makes them."""
    clip = tiny(kind, emb_dir)
    embeds = random_identity(pack, clip, kind, 2, 7)
    token = save(pack, embeds, f"boundary {kind}")
    words = " ".join(["face"] * before)
    prompt = f"{words} S*, {' '.join(['light'] * 80)}"
    ours = inject(pack, clip, embeds, prompt)
    assert_same(ours, comfyui.nodes.CLIPTextEncode().encode(clip, prompt.replace("S*", f" {token} "))[0], prompt)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_two_identities_equal_two_embeddings(comfyui, pack, emb_dir, kind):
    clip = tiny(kind, emb_dir)
    a, b = random_identity(pack, clip, kind, 2, 11), random_identity(pack, clip, kind, 2, 12)
    ta, tb = save(pack, a, f"person a {kind}"), save(pack, b, f"person b {kind}")
    encode = comfyui.nodes.CLIPTextEncode().encode
    prompt = "S1* and S2*, two friends in a cafe, (S2*:1.2) laughing, S1*'s hat"
    reference = prompt.replace("S1*", f" {ta} ").replace("S2*", f" {tb} ")
    ours = inject(pack, clip, a, prompt, "S1*", id_embeds_2=b, trigger_2="S2*")
    assert_same(ours, encode(clip, reference)[0], prompt)
    swapped = inject(pack, clip, b, prompt, "S1*", id_embeds_2=a, trigger_2="S2*")
    assert not torch.equal(swapped[0][0], ours[0][0])  # each identity lands on its own trigger


def test_strength_zero_is_the_prompt_without_the_trigger(comfyui, pack, emb_dir):
    clip = tiny("sd2", emb_dir)
    off = pack["identity"].IdentityEmbeds(parts={"clip_h": torch.zeros(0, width(clip, "h"))}, info={})
    encode = comfyui.nodes.CLIPTextEncode().encode
    for prompt in ["a photo of S*, smiling", "S* in paris, (detailed face:1.2)", f"{'face ' * 74}S* light"]:
        assert_same(inject(pack, clip, off, prompt), encode(clip, prompt.replace("S*", ""))[0], prompt)
    with pytest.raises(ValueError, match="strength 0"):
        pack["nodes"]["DreamID_SaveIDEmbedding"]().save(off, "nothing", True)


def test_trigger_errors_and_common_word_warning(comfyui, pack, emb_dir, caplog):
    TriggerNotFoundError = pack["errors"].TriggerNotFoundError  # noqa: N806 (the pack's own class)
    clip = tiny("sd1", emb_dir)
    embeds = random_identity(pack, clip, "sd1", 2, 5)
    with pytest.raises(TriggerNotFoundError, match="'a photo of a man'.*does not contain the trigger word 'S\\*'"):
        inject(pack, clip, embeds, "a photo of a man")
    with pytest.raises(TriggerNotFoundError, match="S\\*s"):  # a letter glued to it: another word
        inject(pack, clip, embeds, "a photo of S*s")
    for bad in ["", "two words", "(me)", "a:b"]:
        with pytest.raises(TriggerNotFoundError, match="trigger word"):
            inject(pack, clip, embeds, "a photo of me", bad)
    with pytest.raises(TriggerNotFoundError, match="already uses"):
        inject(pack, clip, embeds, "S* and s*", "S*", id_embeds_2=embeds, trigger_2="s*")
    caplog.clear()
    out = pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, "a man next to a man", "man")
    assert "common word" in caplog.text and "all 2 occurrences" in caplog.text
    assert out["ui"]["text"] == ["man: 2 occurrence(s), 2 vector(s) each (common word: all 2 replaced)"]
    caplog.clear()
    pack["nodes"]["DreamID_InjectIDTokens"]().encode(clip, embeds, "a photo of sks", "sks")
    assert "common word" not in caplog.text


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_the_nodes_own_default_prompt_and_trigger(comfyui, pack, emb_dir, kind):
    """What a user meets first: InjectIDTokens with its default text and trigger, unedited."""
    clip = tiny(kind, emb_dir)
    required = pack["nodes"]["DreamID_InjectIDTokens"].INPUT_TYPES()["required"]
    text, trigger = required["text"][1]["default"], required["trigger"][1]["default"]
    assert "S*," in text  # the default has the trigger glued to a comma: what BPE-token matching missed
    embeds = random_identity(pack, clip, kind, 2, 21)
    token = save(pack, embeds, f"default {kind}")
    ours = inject(pack, clip, embeds, text, trigger)
    assert_same(ours, comfyui.nodes.CLIPTextEncode().encode(clip, text.replace(trigger, f" {token} "))[0], text)
    assert not torch.equal(ours[0][0], comfyui.nodes.CLIPTextEncode().encode(clip, text)[0][0][0])
