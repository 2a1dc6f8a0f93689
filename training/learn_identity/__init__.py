"""Learn one identity from a few photos on the user's own frozen SD model (Beyond Inserting, and
textual inversion as its special case), with diffusers: ``python -m training.learn_identity``.

- :mod:`.data`: photos -> face-centred latents (VAE once) and the per-step augmentation + face mask;
- :mod:`.prompts`: training prompts and the identity/reference token bookkeeping;
- :mod:`.init`: the start (encoder S*, a word, a file);
- :mod:`.attention`: the cross-attention processor (per-stage keys/values, attention recording);
- :mod:`.loop`: the optimisation; :mod:`.sampling`: images with either layout; :mod:`.cli`: the command line.

The maths shared with the ComfyUI nodes (attention loss, face mask, stages, the file format) lives
in :mod:`dreamid_core`.
"""
