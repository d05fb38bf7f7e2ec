"""Experiment configs (one get_config(arg) per file); installed as the package pixeldit_jax.configs."""
