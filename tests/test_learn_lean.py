"""The node's learning path is lean (real ComfyUI in-process, CPU, tiny real models):

- autograd reaches only the identity's vectors: no frozen weight is a leaf of the graph, none holds
  ``.grad`` afterwards (also after Cancel and after an error), the weights' objects are back;
- a step keeps no copy of any weight (they are kept by reference, or not at all when streamed), the
  text encoder's in-place adds copy activations only;
- gradient checkpointing lowers what a step keeps; offloading keeps no linear/conv weight and learns the
  same vectors; per-stage UNet stages keep no text-encoder activations;
- the before/after measurement is bounded, encodes its prompt once and stops on Cancel;
- ten runs in a row leave resident memory where the first left it, and MODEL and CLIP bit-identical.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from face_photos import face_photo, needs_photos
from training_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = [pytest.mark.comfyui, needs_photos, pytest.mark.usefixtures("one_thread")]
PACK = Path(__file__).resolve().parents[1]
RES = 64


@pytest.fixture(scope="module")
def pack(comfyui):
    from comfy_env import load_pack

    nodes = load_pack(comfyui.nodes, PACK)
    root = nodes["DreamID_LearnIdentity"].__module__.split(".nodes.")[0]
    return {"nodes": nodes, "mods": lambda name: sys.modules[f"{root}.{name}"]}


@pytest.fixture(scope="module")
def sd1(comfyui):
    """A two-level SD1 UNet (attention at full resolution and in the middle) with a tiny fp32 CLIP-L."""
    pytest.importorskip("diffusers")
    from twin_models import twin

    return twin("sd1")


def photo(size=128, person="tom"):
    return torch.from_numpy(np.asarray(face_photo(person, size=size), dtype=np.float32) / 255.0)[None]


def weights(tw):
    return [*tw.model.model.diffusion_model.parameters(), *tw.clip.cond_stage_model.parameters()]


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Run:
    """The node's learner on the node's host, opened (use as a context manager)."""

    def __init__(self, pack, tw, *, layout="words", attn=0.0, stages=3, kind="time", ckpt=False, offload=False,
                 photos=1, steps=4, lr=0.01):
        self.host_mod, self.core = pack["mods"]("nodes.adapters.learn_host"), pack["mods"]("dreamid_core.learning")
        li, faces, det = (pack["mods"](n) for n in ("dreamid_core.identities.learned_identity",
                                                      "dreamid_core.faces.pipeline", "dreamid_core.faces.detectors"))
        self.modes = (torch.inference_mode(False), torch.enable_grad())
        for m in self.modes:
            m.__enter__()
        self.host = self.host_mod.ComfyHost(tw.model, tw.clip, gradient_checkpointing=ckpt, offload=offload)
        image = torch.cat([photo()] * photos)
        found = faces.FacePipeline(det.make_detector("mtcnn")).process(image).faces
        self.photos = self.host_mod.encode_photos(tw.vae, self.host, image, found, RES)
        self.cfg = li.IdentityConfig(layout=layout, num_stages=stages, stage_kind=kind, steps=steps, lr=lr,
                                     attn_weight=attn, resolution=RES)
        self.opts = self.core.RunOptions(gradient_checkpointing=ckpt)

    def __enter__(self):
        self.host.__enter__()
        start = self.core.from_word_rows(self.host.word_embeddings("person"), 2)
        self.learner = self.core.IdentityLearner(self.host, self.photos, self.cfg, start, self.opts)
        return self

    def __exit__(self, *exc):
        self.host.close()
        for m in reversed(self.modes):
            m.__exit__(*exc)


def graph_leaves(loss: torch.Tensor) -> set[int]:
    """ids of the tensors autograd would accumulate a gradient into."""
    seen, leaves, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        todo.extend(f for f, _ in fn.next_functions)
    return leaves


MODES = [dict(layout="words"), dict(layout="words", attn=0.5), dict(layout="per_stage", attn=0.5),
         dict(layout="per_stage", kind="unet", attn=0.5), dict(layout="words", attn=0.5, ckpt=True),
         dict(layout="words", attn=0.5, offload=True)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_only_the_identity_gets_gradients_and_no_weight_is_copied(pack, sd1, mode):
    ws = weights(sd1)
    ids = [id(w) for w in ws]
    memory = pack["mods"]("dreamid_core.learning.memory")
    with Run(pack, sd1, **mode) as run:
        assert run.host.frozen.copied_bytes == 0  # every weight aliased, none copied
        with memory.SavedTensors(ws) as kept:
            loss, _ = run.learner.loss(0)
        assert graph_leaves(loss) == {id(p) for p in run.learner.params.values()}
        assert kept.copies_of([w for w in ws if w.ndim >= 2]) == []  # no weight kept as a copy
        if mode.get("offload"):
            matrices = {w.untyped_storage().data_ptr() for m in sd1.model.model.diffusion_model.modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for w in [m.weight]}
            assert not matrices & set(kept.kept)  # streamed layers keep nothing of their weights
        else:
            assert kept.weight_storages > 0  # the weights are kept by reference
        loss.backward()
        assert all(p.grad is not None for p in run.learner.params.values())
    assert all(w.grad is None for w in ws) and [id(w) for w in weights(sd1)] == ids


@pytest.mark.skipif(__import__("dreamid_core.learning.memory", fromlist=["x"]).heap_bytes() is None,
                    reason="reads the C heap through glibc's mallinfo2")
def test_checkpointing_holds_less_and_offloading_learns_the_same(pack, sd1):
    memory = pack["mods"]("dreamid_core.learning.memory")
    held, vectors = {}, {}
    for name, mode in {"plain": {}, "ckpt": dict(ckpt=True), "offload": dict(offload=True),
                       "both": dict(ckpt=True, offload=True)}.items():
        with Run(pack, sd1, attn=0.5, **mode) as run:
            run.learner.step(0)  # first-call allocations (optimizer state, caches) out of the way
            (loss, _), held[name] = memory.held_bytes(lambda r=run: r.learner.loss(1))
            del loss
            vectors[name] = run.learner.run().identity.tensors["clip_l"]
    assert held["ckpt"] < 0.5 * held["plain"], held  # what one step holds between forward and backward
    assert held["both"] < 0.5 * held["plain"], held
    for name in ("ckpt", "offload", "both"):
        torch.testing.assert_close(vectors[name], vectors["plain"], rtol=0, atol=1e-5)


def test_per_stage_unet_stages_keep_no_text_encoder_activations(pack, sd1):
    memory = pack["mods"]("dreamid_core.learning.memory")
    width = sd1.clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]

    def text_shaped(k):  # the CLIP's hidden states: [.., 77, width]
        return sum(1 for t in k.kept.values() if t.ndim >= 2 and tuple(t.shape[-2:]) == (77, width))

    counts = {}
    for kind in ("time", "unet"):
        with Run(pack, sd1, layout="per_stage", kind=kind, stages=8) as run:
            with memory.SavedTensors(weights(sd1)) as k:
                run.learner.loss(0)
            counts[kind] = text_shaped(k)
    assert counts["time"] > 0 and counts["unet"] == 0, counts  # 16 encodings per step, recomputed in backward


def test_measurement_is_bounded_encodes_once_and_stops_on_cancel(pack, sd1):
    with Run(pack, sd1, photos=12) as run:
        host = run.host
        calls = {"denoise": 0, "encode": 0}
        denoise, encode = host.denoise, host.encode

        def counting_denoise(*a, **k):
            calls["denoise"] += 1
            return denoise(*a, **k)

        def counting_encode(*a, **k):
            calls["encode"] += 1
            return encode(*a, **k)

        host.denoise, host.encode = counting_denoise, counting_encode
        m = run.learner.measure()
        assert calls == {"denoise": 10, "encode": 1}  # 12 photos: 10 pairs, batch 1; the prompt once
        assert 0 < m.face_mass < 1 and m.diffusion > 0
        calls["denoise"] = 0

        class Stop(Exception):
            pass

        seen = []

        def cancel():
            seen.append(1)
            if len(seen) == 2:
                raise Stop

        with pytest.raises(Stop):
            run.learner.measure(cancel)
        assert calls["denoise"] == 1


def _node(pack, tw, **kw):
    args = dict(model=tw.model, clip=tw.clip, vae=tw.vae, image=photo(), steps=2, learning_rate=0.01,
                attention_loss_weight=0.003, layout="words", num_tokens=2, init_word="person", class_word="person",
                resolution=RES, batch_size=1, seed=0, gradient_checkpointing=False, preview_every=0,
                snapshot_every=0) | kw
    with torch.inference_mode():
        return pack["nodes"]["DreamID_LearnIdentity"]().learn(**args)["result"]


def test_cancel_and_errors_leave_no_gradient_and_the_same_weights(pack, sd1):
    import comfy.model_management as mm
    import comfy.utils

    ws, ids = weights(sd1), [id(w) for w in weights(sd1)]
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             mm.interrupt_current_processing(True))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _node(pack, sd1, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    errors = pack["mods"]("dreamid_core.learning")
    with pytest.raises(errors.LearningDivergedError, match="the loss became"):
        _node(pack, sd1, steps=5, learning_rate=1e30, layout="per_stage", norm="free")
    assert all(w.grad is None for w in ws) and [id(w) for w in weights(sd1)] == ids
    dm = sd1.model.model.diffusion_model
    assert not any("forward" in m.__dict__ for m in [*dm.modules(), *sd1.clip.cond_stage_model.modules()])
    assert not sd1.model.model_options["transformer_options"].get("patches_replace")
    assert _node(pack, sd1, steps=1)[0].config.steps == 1


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc (Linux)")
def test_ten_runs_leave_memory_and_models_as_the_first_left_them(pack, sd1):
    import gc

    before = (state_hash(sd1.model.model), state_hash(sd1.clip.cond_stage_model))
    mib = sum(w.numel() * w.element_size() for w in weights(sd1)) / 2**20
    memory = pack["mods"]("dreamid_core.learning.memory")
    rss, heap = [], []
    for layout in ["words", "per_stage"] * 5:
        _node(pack, sd1, layout=layout, attention_loss_weight=0.5)
        gc.collect()
        rss.append(_rss_mib())
        heap.append((memory.heap_bytes() or 0) / 2**20)
    assert (state_hash(sd1.model.model), state_hash(sd1.clip.cond_stage_model)) == before
    assert all(w.grad is None for w in weights(sd1))
    # a copy of the weights (or of their gradients, or a step's activations) left per run would add up run
    # after run: the heap in use after each run is where the first run of that layout left it (to the MiB),
    # and resident memory (which also holds freed pages glibc keeps, +-16 MiB here) shows no trend
    growth = [heap[i] - heap[i % 2] for i in range(2, len(heap))]
    assert max(growth) < max(0.25 * mib, 1.0), (heap, mib)
    assert max(rss[-2:]) - max(rss[:2]) < max(2 * mib, 24.0), (rss, mib)
