"""Rank-1 factors from `mend.capture` against jax.grad on tiny models of every architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.mend.capture import active_tokens, capture, kernel_grad, summed_nll
from salem_jax.models.base import Weight, get_path

ARCHS = ("gpt2", "gpt_neo", "t5", "bart", "bert", "llama", "llama-remat")


def _tiny(arch):
    if arch.startswith("llama"):
        llama = pytest.importorskip("salem_jax.models.llama", reason="salem_jax.models.llama (tiny_llama) is missing")
        # remat: the blocks run inside nn.remat, a lifted transform (no side effects may escape it)
        return llama.tiny_llama(remat=arch == "llama-remat")
    from salem_jax.models import hf

    try:
        return hf.tiny(arch)
    except NotImplementedError as e:
        pytest.skip(f"hf.tiny({arch!r}) is not available: {e}")


def _batch(model):
    # Two rows of different lengths, so the shorter one is right-padded.
    if model.kind == "classifier":
        return encode(model, ["the capital of france is paris", "one two"], [1, 0])
    # Encoder and decoder sequences get different lengths, so a module's token axis tells
    # which one it runs over (cross-attention k/v in a decoder block read the encoder's).
    length, target_length = (32, 16) if model.kind == "seq2seq" else (None, None)
    return encode(
        model, ["the capital of france is", "one two"], ["paris", "three four five"],
        length=length, target_length=target_length,
    )


def _mask_for(n_tokens, batch):
    """The attention mask of the sequence (encoder or decoder) that has n_tokens positions."""
    for key in ("attention_mask", "decoder_attention_mask"):
        if key in batch and batch[key].shape[1] == n_tokens:
            return batch[key]
    raise AssertionError(f"no sequence of {n_tokens} tokens in the batch")


@pytest.mark.parametrize("arch", ARCHS)
def test_factors_give_the_exact_kernel_gradient(arch):
    model = _tiny(arch)
    batch = {k: jnp.asarray(v) for k, v in _batch(model).items()}
    names = model.layers.names()
    # Every weight (MLP and attention) of the first and the last block: encoder and decoder
    # blocks for seq2seq models.
    weights = model.layers.weights([names[0], names[-1]], part="all")
    def both(params, batch):
        ours = capture(model.apply, params, batch, weights)
        # independent reference: the plain gradient of the same loss w.r.t. all parameters
        ref = jax.value_and_grad(lambda p: summed_nll(model.apply(p, batch), batch))(params)
        return ours, ref

    # one jit for both: on CPU compiling once is much cheaper than running op by op
    (loss, factors), (ref_loss, grads) = jax.jit(both)(model.params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for w in weights:
        f = factors[w.path]
        kernel = get_path(model.params, w.path)
        fan_in, fan_out = w.in_out_shape(kernel.shape)
        assert f.u.shape[-1] == fan_in and f.delta.shape[-1] == fan_out
        g = get_path(grads, w.path)
        ours = kernel_grad(f.u, f.delta, w.layout)
        assert ours.shape == kernel.shape
        scale = float(jnp.abs(g).max())
        assert scale > 0, f"{w.path}: zero gradient, the comparison would say nothing"
        np.testing.assert_allclose(ours, g, atol=1e-6 * max(scale, 1.0), rtol=1e-5, err_msg=w.path)
        # Padding tokens carry no gradient (and are not active).
        pad = np.asarray(_mask_for(f.delta.shape[1], batch)) == 0
        assert pad.any()
        assert np.all(np.asarray(f.delta)[pad] == 0), w.path
        assert not np.asarray(active_tokens(f))[pad].any()


def test_kernel_grad_layouts_against_a_loop():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 3, 4)).astype(np.float32)
    d = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    ref = np.zeros((4, 5), np.float32)
    for b in range(2):
        for t in range(3):
            ref += mask[b, t] * np.outer(u[b, t], d[b, t])
    np.testing.assert_allclose(kernel_grad(u, d, "in_out", mask), ref, rtol=1e-5)
    np.testing.assert_allclose(kernel_grad(u, d, "out_in", mask), ref.T, rtol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        kernel_grad(u, d, "rows")


def test_capture_errors_are_clear():
    from salem_jax.models import hf

    model = hf.tiny("gpt2")
    batch = _batch(model)
    # under jax.jit (raised while tracing; eager, the forward's ops ran one compiled program each
    # until the error)
    with pytest.raises(KeyError, match="no parameter"):
        jax.jit(lambda p, b: capture(model.apply, p, b, [Weight("transformer/h/9/mlp/c_fc/kernel", "out_in")]))(
            model.params, batch)
    # Our GPT-2's kernels are [in, out] (nn.Dense); calling one "out_in" must not silently transpose.
    with pytest.raises(ValueError, match="layout"):
        jax.jit(lambda p, b: capture(model.apply, p, b, [Weight("transformer/h/0/mlp/c_fc/kernel", "out_in")]))(
            model.params, batch)
