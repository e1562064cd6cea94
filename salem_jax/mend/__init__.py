"""MEND-style editing of the salient layers: capture, editor network, training, checkpoints, applying edits."""

from salem_jax.mend.capture import Factors, active_tokens, capture, kernel_grad, summed_nll
from salem_jax.mend.editor import EditorConfig, EditorSpec, edited_params, init_editor, pseudo_grads, update_norm_state

__all__ = [
    "EditorConfig",
    "EditorSpec",
    "Factors",
    "active_tokens",
    "capture",
    "edited_params",
    "init_editor",
    "kernel_grad",
    "pseudo_grads",
    "summed_nll",
    "update_norm_state",
]
