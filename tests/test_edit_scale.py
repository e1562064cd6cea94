"""`mend.apply.scaled_editor` and `config.eval.mend_edit_scale`: an editor whose edit is s times the
trained one's, checked against the hand computation base + s * (edit - base)."""

import jax
import numpy as np
import pytest

from experiments import capitals_smollm2
from salem_jax.mend.apply import apply_edits, scaled_editor
from salem_jax.models import hf
from salem_jax.models.base import get_path
from salem_jax.testing import noisy_editor, refused_up_front

REQS = [dict(prompt="the capital of france is", target="paris")]


def _editor(model):
    """An editor on h.1 whose nets are not the identity (seeded noise on every net weight)."""
    return noisy_editor(model, ["h.1"])


def test_scaled_edit_is_the_scaled_difference_and_nothing_else_moves():
    model = hf.tiny("gpt2", seed=0, n_layer=2)
    editor = _editor(model)
    full = apply_edits(model, editor, REQS, progress=False)
    paths = [w.path for w in editor.spec.weights]
    moved = [np.abs(np.asarray(get_path(full, p)) - np.asarray(get_path(model.params, p))).max() for p in paths]
    assert min(moved) > 1e-6  # the edit changes every edited kernel, so the comparison below can fail
    for s in (0.5, 1.7):
        got = apply_edits(model, scaled_editor(editor, s), REQS, progress=False)
        for p in paths:
            base, edit = np.asarray(get_path(model.params, p)), np.asarray(get_path(full, p))
            np.testing.assert_allclose(np.asarray(get_path(got, p)), base + s * (edit - base), rtol=1e-5, atol=1e-6)
        # every other leaf is the base model's (the edit touches the edited kernels only)
        flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
        flat_base = dict(jax.tree_util.tree_flatten_with_path(model.params)[0])
        n_changed = sum(not np.array_equal(np.asarray(v), np.asarray(flat_base[k])) for k, v in flat_got)
        assert n_changed == len(paths)
    assert scaled_editor(editor, 1.0) is editor
    assert scaled_editor(editor, 0.5).meta["edit_scale"] == 0.5 and editor.meta == {}  # the original untouched
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="edit scale"):
            scaled_editor(editor, bad)


def test_pipeline_refuses_a_bad_scale_before_reading_anything(tmp_path):
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.eval.mend_edit_scale = -0.5
    refused_up_front(cfg, tmp_path / "work", "mend_edit_scale")
