"""Identities in prompts and in files.

- :mod:`.embeds`: S* per text encoder, and the one rule for which identity fits which text encoder;
- :mod:`.families`: the one table of which text encoders (embedding keys) each model family reads;
- :mod:`.trigger` + :mod:`.tokens`: the trigger word found in a prompt, and the token chunks laid out exactly
  as ComfyUI lays out ``embedding:NAME``; :mod:`.regions`: each identity's tokens bound to its head region;
- :mod:`.learned_identity` (identities of both layouts and snapshots: the one writer of identity files) and
  :mod:`.embedding_io` (reading any textual-inversion file; safe file names).
"""
