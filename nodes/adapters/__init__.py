"""ComfyUI adapters that are not node classes: how the nodes reach ComfyUI's objects.

- :mod:`.comfy_tokens`: ComfyUI's tokenizers fed to ``dreamid_core.identities.tokens`` (a prompt with
  identities, laid out as ``embedding:NAME``); :mod:`.attention_patches`: the pack's attention patches;
  :mod:`.per_stage`: generating with a learned identity of either layout;
- :mod:`.learn_host`: the identity learner's host on MODEL/CLIP/VAE; :mod:`.learn_watch`: previews and
  snapshots while it learns; :mod:`.loss_plot`: the loss curve as an IMAGE;
- :mod:`.paths`: the model folders the pack registers and the files its loaders list;
  :mod:`.validation`: input checks ComfyUI's own validation lets through.
"""
