"""Phase 1, the self-augmented editing dataset (DreamIdentity Sec. 3.3): ``python -m training.build_dataset STEP``
(:mod:`.cli`). The four resumable, sharded steps are :mod:`.steps`; the names and the paper's edit templates
:mod:`.edit_prompts`; which edits are kept :mod:`.selection`. Images come from :mod:`training.common.generation`,
scores from :mod:`training.common.scorers`, records go to :mod:`training.common.records`.
"""
