"""THE identity learner: one implementation for the ComfyUI node and the command line.

Only the identity's vectors learn (float32 ``torch.nn.Parameter`` s); the model is frozen behind a
:class:`.host.LearnHost`. Step ``i`` draws everything from ``step_generator(seed, i)``, in this order:

    latents, masks = photos.draw(batch)        # augmented views (crop/scale jitter, flip) + face masks
    templates      = randint(len(TEMPLATES), [B])   # one training prompt per sample
    noise          = randn(latents.shape);  t = randint(num_timesteps, [B])   # one timestep per sample
    x_t, sigma     = host.noise(latents, noise, t)
    words:     context = encode(template with S*)
    per_stage: keys/values = encode(template with K[s] / V[s]) for the row's stage (stage_kind "time")
               or for every stage, each layer reading its own (stage_kind "unet"); the pooled vector
               (SDXL) and c_crossattn come from the last stage's keys, as at generation time
    diffusion = prediction_loss(model's own space, x0, denoised, sigma)        (:mod:`.loss`)
    attention = mean over recorded layers and samples of face_attention_loss(maps with S*, maps of the
                class-word prompt (one no-grad forward), face mask)             (:mod:`.attention_loss`)
    loss      = diffusion + attn_weight * attention        -> Adam on the vectors

A non-finite loss stops the run (:class:`LearningDivergedError`) before it reaches the vectors.

Norms (``config.norm``): "vocabulary" keeps every vector at the median norm of its text encoder's word
embeddings and learns only its direction (Directional Textual Inversion, arXiv 2512.13672): the start is
scaled onto that sphere and each Adam update is followed by the same projection, so the constraint
holds after every step. "free" is plain textual inversion.

Resume: :meth:`resume_state` is everything a run needs to continue besides the vectors (steps done,
Adam's moments and step counts); a learner made with ``resume=`` continues at that step. Because every
step's draws come from ``step_generator(seed, step)``, N steps, a snapshot, and N more steps give the
vectors of 2N steps in one run, bit for bit on the same device.
``measure()`` is the before/after report: diffusion loss and face mass on fixed (photo, timestep)
pairs with fixed noise, the same for every run of the same photos, at most ``measure_pairs`` forwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..identities.embeds import fit_parts
from ..identities.learned_identity import IdentityConfig, LearnedIdentity, ResumeState
from .attention_loss import face_attention_loss, face_mass, resize_mask
from .host import Conditioning, LearnHost, Noised, encode_recomputed
from .init import start_tensors
from .loss import prediction_error
from .photos import PhotoSet
from .prompts import PLACEHOLDER, Encoded, check_templates, pair_words
from .seeding import step_generator
from .settings import LearningDivergedError, LearnSettingsError, RunOptions, check_settings
from .stages import stage_for_timestep

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    loss: float
    diffusion: float
    attention: float = 0.0
    face_mass: float | None = None  # identity tokens' attention inside the face (when recorded)


@dataclass
class Measure:
    diffusion: float
    face_mass: float | None  # None: the host records no attention maps (FLUX.1 / SD3 for now)


@dataclass
class LearnResult:
    identity: LearnedIdentity
    history: list[StepStats] = field(default_factory=list)
    initial: Measure | None = None
    final: Measure | None = None
    seconds: float = 0.0


def _mass(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class IdentityLearner:
    """Learns one identity on a frozen model behind ``host`` (see the module docstring)."""

    def __init__(self, host: LearnHost, photos: PhotoSet, config: IdentityConfig, start: dict[str, torch.Tensor],
                 options: RunOptions | None = None, *, resume: ResumeState | None = None) -> None:
        self.options = opts = options or RunOptions()
        check_settings(config, opts, host.resolution_multiple)
        if photos.resolution != config.resolution:
            raise LearnSettingsError(f"the photos were prepared at {photos.resolution} px but the run is set to "
                                     f"{config.resolution} px")
        self.host, self.photos, self.config = host, photos, config
        self.templates = check_templates(opts.templates)
        widths = {k: int(v.shape[-1]) for k, v in host.word_embeddings(config.class_word).items()}
        start = start_tensors(config.layout, fit_parts(start, widths, "the start identity"),
                              k=config.num_tokens, num_stages=config.num_stages)
        self.params = {k: torch.nn.Parameter(v.to(host.device, torch.float32)) for k, v in start.items()}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=host.compute_dtype == torch.float16
                                           and host.device.type == "cuda")
        host.max_queries = opts.max_queries
        self.class_rows = host.word_embeddings(config.class_word)  # {key: [m, D]}
        self._references: dict[int, Encoded] = {}
        self._pairs: dict[int, tuple] = {}
        self.next_step = 0
        S = config.num_stages
        #: text encodings that a step needs at once: recomputed in backward when there are many
        self._recompute_text = opts.gradient_checkpointing or (
            config.layout == "per_stage" and config.stage_kind == "unet" and S > 1)
        self.vocabulary_norm = host.vocabulary_norm()  # {key: median norm of the word embeddings}
        self.norm_targets = self.vocabulary_norm if config.norm == "vocabulary" else None
        if resume is not None:
            self.load_resume(resume)  # its vectors are on the sphere already: projecting again would round them
        else:
            self.project_norms()

    # -- prompts --------------------------------------------------------------------------------------

    def reference(self, template: int) -> Encoded:
        """The class-word prompt of a template (no gradient, encoded once per run)."""
        if template not in self._references:
            with torch.no_grad():
                self._references[template] = self.host.encode(self.templates[template].format(PLACEHOLDER),
                                                              self.class_rows)
        return self._references[template]

    def _vectors(self, stage: int | None, kv: int) -> dict[str, torch.Tensor]:
        if stage is None:
            return dict(self.params)
        return {k: p[stage, kv] for k, p in self.params.items()}

    def _encode(self, template: int, stage: int | None, kv: int, cache: dict) -> Encoded:
        key = (template, stage, kv)
        if key not in cache:
            prompt, vectors = self.templates[template].format(PLACEHOLDER), self._vectors(stage, kv)
            grad = torch.is_grad_enabled()
            cache[key] = (encode_recomputed(self.host, prompt, vectors) if grad and self._recompute_text
                          else self.host.encode(prompt, vectors))
        return cache[key]

    def conditioning(self, picks: list[int], t: torch.Tensor, cache: dict | None = None
                     ) -> tuple[Conditioning, list[Encoded]]:
        """The identity prompts of a batch (template ``picks[b]``, timestep ``t[b]``) and each row's encoding
        (whose ``positions`` the attention loss reads)."""
        cache = {} if cache is None else cache
        cfg = self.config
        cat = torch.cat
        if cfg.layout == "words":
            encs = [self._encode(p, None, 0, cache) for p in picks]
            pooled = cat([e.pooled for e in encs]) if encs[0].pooled is not None else None
            return Conditioning(cat([e.context for e in encs]), pooled), encs
        S = cfg.num_stages
        if cfg.stage_kind == "time":
            stages = [stage_for_timestep(float(v), S, self.host.num_timesteps) for v in t.tolist()]
            encs = [self._encode(p, s, 0, cache) for p, s in zip(picks, stages, strict=True)]
            keys = cat([e.context for e in encs])[None]  # [1, B, L, C]
            values = cat([self._encode(p, s, 1, cache).context for p, s in zip(picks, stages, strict=True)])[None]
        else:
            encs = [self._encode(p, S - 1, 0, cache) for p in picks]
            keys = torch.stack([cat([self._encode(p, s, 0, cache).context for p in picks]) for s in range(S)])
            values = torch.stack([cat([self._encode(p, s, 1, cache).context for p in picks]) for s in range(S)])
        # every cross-attention reads keys/values; what else reads the prompt (SDXL's pooled vector) gets the
        # last stage's keys, as DreamID_ApplyPerStageIdentity gives the sampler
        last = encs if encs[0].pooled is None else [self._encode(p, S - 1, 0, cache) for p in picks]
        pooled = cat([e.pooled for e in last]) if last[0].pooled is not None else None
        return Conditioning(cat([e.context for e in last]), pooled, keys, values), encs

    def _references_of(self, picks: list[int]) -> Conditioning:
        refs = [self.reference(p) for p in picks]
        pooled = torch.cat([r.pooled for r in refs]) if refs[0].pooled is not None else None
        return Conditioning(torch.cat([r.context for r in refs]), pooled)

    def _pairs_of(self, template: int, enc: Encoded) -> tuple:
        if template not in self._pairs:
            self._pairs[template] = pair_words(enc, self.reference(template), self.templates[template])
        return self._pairs[template]

    # -- one step -------------------------------------------------------------------------------------

    def _draw(self, gen: torch.Generator, masks: bool) -> tuple[Noised, torch.Tensor | None, list[int]]:
        opts, host = self.options, self.host
        x0, face = self.photos.draw(gen, opts.batch_size, augment=opts.augment, scale_jitter=opts.scale_jitter,
                                    flip_p=opts.flip_p, masks=masks)  # [B, C, h, w], [B, h, w]
        picks = torch.randint(0, len(self.templates), (opts.batch_size,), generator=gen).tolist()
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, host.num_timesteps, (opts.batch_size,), generator=gen)
        dev = host.device
        return host.noise(x0.to(dev), noise.to(dev), t.to(dev)), face, picks

    def attention_term(self, maps: list[torch.Tensor], ref_maps: list[torch.Tensor], masks: torch.Tensor,
                       picks: list[int], encs: list[Encoded]) -> tuple[torch.Tensor, float]:
        """Mean over recorded layers and samples of the face-wise loss, and the identity's face mass."""
        if not maps:
            raise RuntimeError("no cross-attention layer was recorded: max_queries is below every layer's size")
        losses, masses = [], []
        wc, wk, wf = self.options.attn_terms
        for probs, ref in zip(maps, ref_maps, strict=True):
            m = resize_mask(masks, probs.shape[2]).to(probs.device)  # [B, HW]
            for b, p in enumerate(picks):
                loss, _ = face_attention_loss(probs[b:b + 1], ref[b:b + 1], m[b:b + 1], encs[b].positions,
                                              self.reference(p).positions, self._pairs_of(p, encs[b]),
                                              context_weight=wc, class_weight=wk, face_weight=wf)
                losses.append(loss)
                masses.append(face_mass(probs[b:b + 1].detach(), encs[b].positions, m[b:b + 1]))
        return torch.stack(losses).mean(), float(torch.cat(masses).mean())

    def loss(self, index: int) -> tuple[torch.Tensor, StepStats]:
        """The loss of step ``index`` (any index: the draws depend on it alone), with its graph, and its stats."""
        cfg, host = self.config, self.host
        use_attn = cfg.attn_weight > 0
        noised, masks, picks = self._draw(step_generator(cfg.seed, index), masks=use_attn)
        ref_maps: list[torch.Tensor] = []
        if use_attn:
            with torch.no_grad():
                _, ref_maps = host.denoise(noised, self._references_of(picks), record=True)
        cond, encs = self.conditioning(picks, noised.t)
        denoised, maps = host.denoise(noised, cond, record=use_attn)
        diffusion = prediction_error(host.prediction, noised.x0, denoised, noised.sigma).square().mean()
        attention, mass = (self.attention_term(maps, ref_maps, masks, picks, encs) if use_attn
                           else (diffusion.new_zeros(()), None))
        loss = diffusion + cfg.attn_weight * attention
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LearningDivergedError(
                f"the loss became {value} at step {index + 1}; lower learning_rate (now {cfg.lr}) or "
                f"attention_loss_weight (now {cfg.attn_weight}). The vectors keep their values from step {index}.")
        return loss, StepStats(loss=value, diffusion=float(diffusion.detach()), attention=float(attention.detach()),
                               face_mass=mass)

    def step(self, index: int) -> StepStats:
        """Step ``index``: its loss, backward, and the optimiser's update of the vectors."""
        loss, stats = self.loss(index)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.project_norms()
        self.next_step = index + 1
        return stats

    # -- norms and resuming ---------------------------------------------------------------------------

    @torch.no_grad()
    def project_norms(self) -> None:
        """With the vocabulary norm: every vector (last dimension) back onto its encoder's sphere."""
        if self.norm_targets is None:
            return
        for key, p in self.params.items():
            p.mul_(self.norm_targets[key] / p.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def norms(self) -> dict[str, list[float]]:
        """Each vector's norm, per text encoder key (words: k values; per_stage: S x 2 x k, flattened)."""
        return {k: [round(float(v), 5) for v in p.detach().norm(dim=-1).flatten()] for k, p in self.params.items()}

    def resume_state(self, run: dict | None = None) -> ResumeState:
        """What continuing this run needs besides the vectors (see the module docstring)."""
        moments, steps = {}, {}
        for key, p in self.params.items():
            st = self.optimizer.state.get(p)
            if st:
                moments[key] = {"exp_avg": st["exp_avg"].detach().cpu().clone(),
                                "exp_avg_sq": st["exp_avg_sq"].detach().cpu().clone()}
                steps[key] = float(st["step"])
        return ResumeState(self.next_step, moments, steps, dict(run or {}))

    def load_resume(self, resume: ResumeState) -> None:
        for key, p in self.params.items():
            moments = resume.optimizer.get(key)
            if moments is None:
                if resume.step:
                    raise LearnSettingsError(f"the snapshot at step {resume.step} holds no optimizer state for {key}")
                continue
            for name in ("exp_avg", "exp_avg_sq"):
                if tuple(moments[name].shape) != tuple(p.shape):
                    raise LearnSettingsError(f"the snapshot's {key} {name} is {tuple(moments[name].shape)} but the "
                                             f"run's vectors are {tuple(p.shape)}")
            self.optimizer.state[p] = {"step": torch.tensor(resume.optimizer_steps[key], dtype=torch.float32),
                                       "exp_avg": moments["exp_avg"].to(p.device, torch.float32).clone(),
                                       "exp_avg_sq": moments["exp_avg_sq"].to(p.device, torch.float32).clone()}
        self.next_step = int(resume.step)

    # -- the report -----------------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, cancel: Callable[[], None] | None = None) -> Measure:
        """Diffusion loss and face mass on fixed (photo, timestep) pairs (see the module docstring)."""
        opts, host = self.options, self.host
        # measure_timesteps are on the 1000-step scale of SD; a model with another table (FLUX's 10000) gets the
        # same fractions of it
        times = [min(host.num_timesteps - 1, round(v * host.num_timesteps / 1000)) for v in opts.measure_timesteps]
        count = max(len(times), min(len(self.photos), opts.measure_pairs))
        index = [i % len(self.photos) for i in range(count)]
        t_all = torch.tensor([times[i % len(times)] for i in range(count)], dtype=torch.long)
        x0_all, masks_all = self.photos.fixed(index)
        noise_all = torch.randn(x0_all.shape, generator=torch.Generator().manual_seed(opts.measure_seed))
        cache: dict = {}
        losses, masses = [], []
        for lo in range(0, count, opts.batch_size):
            if cancel is not None:
                cancel()
            sl = slice(lo, lo + opts.batch_size)
            dev = host.device
            noised = host.noise(x0_all[sl].to(dev), noise_all[sl].to(dev), t_all[sl].to(dev))
            n = noised.x_t.shape[0]
            cond, encs = self.conditioning([0] * n, noised.t, cache)
            denoised, maps = host.denoise(noised, cond, record=True)
            err = prediction_error(host.prediction, noised.x0, denoised, noised.sigma)
            losses += err.square().flatten(1).mean(1).tolist()
            for probs in maps:
                m = resize_mask(masks_all[sl], probs.shape[2]).to(probs.device)
                masses += face_mass(probs, encs[0].positions, m).tolist()
        return Measure(diffusion=sum(losses) / len(losses), face_mass=sum(masses) / len(masses) if masses else None)

    # -- the run --------------------------------------------------------------------------------------

    def vectors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", torch.float32).clone() for k, p in self.params.items()}

    def identity(self, resume: dict | None = None, **extra: Any) -> LearnedIdentity:
        """The identity so far; ``resume`` (the run's settings) makes it a snapshot that can be continued."""
        norms = {"norms": self.norms(), "vocabulary_norm": {k: round(v, 5) for k, v in self.vocabulary_norm.items()}}
        config = dataclasses.replace(self.config, extra={**self.config.extra, **norms, **extra})
        return LearnedIdentity(config, self.vectors(), None if resume is None else self.resume_state(resume))

    def run(self, on_step: Callable[[int, StepStats], None] | None = None,
            cancel: Callable[[], None] | None = None) -> LearnResult:
        """The remaining steps (from ``next_step`` to ``config.steps``) between two measurements.
        ``cancel()`` is called before every step and measurement chunk (it raises to stop);
        ``on_step(i, stats)`` after every step."""
        t0 = time.perf_counter()
        initial = self.measure(cancel)
        history: list[StepStats] = []
        for i in range(self.next_step, self.config.steps):
            if cancel is not None:
                cancel()
            history.append(self.step(i))
            if on_step is not None:
                on_step(i, history[-1])
        final = self.measure(cancel)
        seconds = time.perf_counter() - t0
        ident = self.identity(num_photos=len(self.photos), batch_size=self.options.batch_size,
                              augment=self.options.augment, initial_diffusion_loss=initial.diffusion,
                              final_diffusion_loss=final.diffusion, initial_face_mass=initial.face_mass,
                              face_mass=final.face_mass, seconds=round(seconds, 2))
        logger.info("learned a %s identity: %d steps in %.1f s, diffusion loss %.4f -> %.4f, face attention %s -> "
                    "%s", self.config.layout, len(history), seconds, initial.diffusion, final.diffusion,
                    _mass(initial.face_mass), _mass(final.face_mass))
        return LearnResult(ident, history, initial, final, seconds)
