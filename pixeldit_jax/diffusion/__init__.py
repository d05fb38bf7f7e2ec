"""Diffusion: time conventions, training objective and samplers (pure functions of a model apply)."""
