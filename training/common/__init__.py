"""What the phases share: the frozen base model (:mod:`.base_model`), S* into its text encoders
(:mod:`.prompt_encoding`), the seeded diffusion maths (:mod:`.diffusion`), image generation
(:mod:`.generation`), VAE latents (:mod:`.latents`), the CLIP and identity scorers (:mod:`.scorers`),
resumable JSONL records (:mod:`.records`) and file locks (:mod:`.locking`).
"""
