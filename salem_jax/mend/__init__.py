"""MEND-style editing of the salient layers (SaLEM section 3.3).

capture     rank-1 gradient factors (u, delta) of chosen weights, via flax.linen.intercept_methods
editor      the editor network: shared low-rank MLPs, running normalisation, learned edit lrs
train       the data-parallel training loop (one jitted shard_map step, optax, early stopping)
checkpoint  orbax checkpoints of a run (resume, best/latest, mismatch and corruption errors)
apply       load a trained editor, apply edit requests (batch / sequential), save the model
"""

from salem_jax.mend.apply import TrainedEditor, apply_edits, load_editor, read_requests, save_edited
from salem_jax.mend.capture import Factors, active_tokens, capture, kernel_grad, summed_nll
from salem_jax.mend.editor import EditorConfig, EditorSpec, edited_params, init_editor, pseudo_grads, update_norm_state
from salem_jax.mend.train import EditData, TrainConfig, TrainResult, evaluate, prepare_splits, train_editor

__all__ = [
    "EditData",
    "EditorConfig",
    "EditorSpec",
    "Factors",
    "TrainConfig",
    "TrainResult",
    "TrainedEditor",
    "active_tokens",
    "apply_edits",
    "capture",
    "edited_params",
    "evaluate",
    "init_editor",
    "kernel_grad",
    "load_editor",
    "prepare_splits",
    "pseudo_grads",
    "read_requests",
    "save_edited",
    "summed_nll",
    "train_editor",
    "update_norm_state",
]
