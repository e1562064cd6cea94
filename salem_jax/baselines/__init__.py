"""Baseline editors run through the same evaluation as SaLEM: FT, FT+KL and ROME.

Import the functions from their modules (`salem_jax.baselines.finetune.finetune`,
`salem_jax.baselines.rome.rome_edit`); `finetune` is not re-exported here because it
shares its module's name.
"""
