"""`salem_jax.testing.module_inputs` (the hand reading of a module's inputs the key-statistics tests compare
against): memoised per (model, text), it must still equal a fresh interception on every call, keep two
models apart and hand out read-only arrays."""

from __future__ import annotations

import flax.linen as nn
import numpy as np
import pytest

from salem_jax import testing
from salem_jax.models.llama import tiny_llama


def _fresh(model, module_path, text):
    """The module's inputs from a new forward pass with its own interceptor (no memo)."""
    ids = np.asarray([model.tokenizer(text)["input_ids"]], np.int32)
    seen = []

    def icpt(f, args, kwargs, ctx):
        if ctx.method_name == "__call__" and "/".join(ctx.module.path) == module_path:
            seen.append(np.asarray(args[0], np.float64)[0])
        return f(*args, **kwargs)

    with nn.intercept_methods(icpt):
        model.apply(model.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return seen[-1]


def test_memoised_inputs_equal_a_fresh_reading_and_keep_models_apart():
    a, b = tiny_llama(seed=2), tiny_llama(seed=3)  # same module paths, other weights
    w = a.layers.weights([a.layers.names()[1]])
    text = "the capital of france is paris"
    for model in (a, b, a):  # a again after b: the memo must not hand a's entry to b or b's to a
        for x in w:
            got = testing.module_inputs(model, x.module_path, text)
            np.testing.assert_array_equal(got, _fresh(model, x.module_path, text))
            assert not got.flags.writeable
    assert not np.allclose(testing.module_inputs(a, w[-1].module_path, text),
                           testing.module_inputs(b, w[-1].module_path, text))
    with pytest.raises(KeyError, match="never called"):
        testing.module_inputs(a, "no/such/module", text)
