"""The DreamIdentity training stack, one package per phase; each command is its phase's package.

- :mod:`training.build_dataset`: phase 1, the self-augmented editing dataset (``python -m training.build_dataset``);
- :mod:`training.train`: phase 2, training the ID encoder (``python -m training.train``);
- :mod:`training.export`: a checkpoint -> the encoder file the ComfyUI nodes load (``python -m training.export``);
- :mod:`training.evaluate`: phase 3, the paper's evaluation (``python -m training.evaluate``,
  ``python -m training.evaluate_identities`` for several methods in one table);
- :mod:`training.learn_identity`: one identity learned from a few photos (``python -m training.learn_identity``);
- :mod:`training.common`: what the phases share (base model, prompt encoding, diffusion maths, generation,
  latents, scorers, records, locks).

The model maths the ComfyUI nodes also use lives in :mod:`dreamid_core`; nothing here imports ComfyUI.
"""
