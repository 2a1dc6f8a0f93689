"""The DreamIdentity encoder: face ViT backbone -> multi-scale features -> k MLPs -> S*.

- :mod:`.backbone` (the face ViT, features returned explicitly), :mod:`.model` (:class:`IDEncoder`),
  :mod:`.config` (the one config dataclass of an encoder file, and the presets);
- :mod:`.weights`: encoder files (safetensors, config in the metadata) and arcface_torch backbones;
- :mod:`.identity`: photos of one person -> S* (the one path the node, the command line and evaluation use).
"""
