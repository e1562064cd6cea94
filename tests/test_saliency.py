"""SaLEM saliency (eq. 2-5) against hand-written computations on tiny models."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax import saliency as S
from salem_jax.data.tokenize import encode
from salem_jax.locate.profile import LayerProfile, top_k_layers
from salem_jax.losses import example_nll
from salem_jax.models import hf
from salem_jax.models.base import Block, LayerTable, LoadedModel, Weight, get_path

PROMPTS = [
    "the capital of france is",
    "the capital of peru is",
    "what city is the capital of japan",
    "the capital of chile is",
    "which city is the capital of kenya",
]
TARGETS = ["paris", "lima", "tokyo", "santiago", "nairobi city"]
GROUPS = ["fail", "fail", "adapt", "pass", "pass"]


@functools.partial(jax.jit, static_argnums=(0,))
def _grad1(apply, params, ex):
    return jax.grad(lambda p: example_nll(apply(p, ex), ex["labels"], ex["label_mask"])[0])(params)


def hand_grads(model, batch):
    """One example at a time: jax.grad of that example's loss, as numpy trees."""
    out = []
    for i in range(len(batch["input_ids"])):
        ex = {k: jnp.asarray(v[i : i + 1]) for k, v in batch.items()}
        out.append(jax.tree.map(np.asarray, _grad1(model.apply, model.params, ex)))
    return out


def np_colmean(w: Weight, a: np.ndarray) -> np.ndarray:
    return a.mean(axis=0) if w.layout == "in_out" else a.mean(axis=1)


def np_layer(model, per_weight: dict) -> np.ndarray:
    return np.asarray([np.concatenate([per_weight[w.path] for w in b.mlp]).mean() for b in model.layers.blocks])


def hand_scores(model, grads, groups):
    """Per-group layer scores of every scorer, computed in numpy from per-example gradients."""
    groups = np.asarray(groups)
    out = {}
    per_ex = {name: [] for name in ("salem", "grad_x_weight", "mean_sq")}
    for g in grads:
        for name, f in (
            ("salem", lambda a, W: np.abs(a)),
            ("grad_x_weight", lambda a, W: np.abs(a * W)),
            ("mean_sq", lambda a, W: a**2),
        ):
            cols = {
                w.path: np_colmean(w, f(get_path(g, w.path), np.asarray(get_path(model.params, w.path))))
                for b in model.layers.blocks
                for w in b.mlp
            }
            per_ex[name].append(np_layer(model, cols))
    per_ex = {k: np.stack(v) for k, v in per_ex.items()}
    for name, v in per_ex.items():
        out[name] = {grp: v[groups == grp].mean(0) for grp in set(groups)} | {"overall": v.mean(0)}
    amg = {}
    for grp in list(set(groups)) + ["overall"]:
        sel = [g for g, k in zip(grads, groups) if grp == "overall" or k == grp]
        cols = {
            w.path: np_colmean(w, np.abs(np.mean([get_path(g, w.path) for g in sel], axis=0)))
            for b in model.layers.blocks
            for w in b.mlp
        }
        amg[grp] = np_layer(model, cols)
    out["abs_mean_grad"] = amg
    s = per_ex["salem"]
    out["contrast"] = {
        "fail": s[groups == "fail"].mean(0) - s[groups == "pass"].mean(0),
        "overall": s[groups != "pass"].mean(0) - s[groups == "pass"].mean(0),
    }
    return out, per_ex


@pytest.fixture(scope="module")
def gpt2():
    m = hf.tiny("gpt2")
    return m, encode(m, PROMPTS, TARGETS)


@pytest.fixture(scope="module")
def gpt2_stats(gpt2):
    m, b = gpt2
    return S.saliency_stats(m, m.params, (b, GROUPS), micro_batch=2)


@pytest.fixture(scope="module")
def gpt2_grads(gpt2):
    m, b = gpt2
    return hand_grads(m, b)


def test_profile_equals_hand_loop_decoder_only(gpt2, gpt2_stats, gpt2_grads):
    m, _ = gpt2
    hand, per_ex = hand_scores(m, gpt2_grads, GROUPS)
    st = gpt2_stats
    assert st.counts() == {"fail": 2, "adapt": 1, "pass": 2}
    for scorer in ("salem", "grad_x_weight", "mean_sq", "abs_mean_grad"):
        for grp in ("fail", "adapt", "pass", "overall"):
            np.testing.assert_allclose(st.layer_scores(scorer, grp), hand[scorer][grp], rtol=2e-5, err_msg=scorer)
    for grp in ("fail", "overall"):
        np.testing.assert_allclose(st.layer_scores("contrast", grp), hand["contrast"][grp], rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(st.per_example["salem"], per_ex["salem"], rtol=2e-5)
    # |mean g| is a different quantity from mean |g| (never larger)
    assert np.all(st.layer_scores("abs_mean_grad", "fail") <= st.layer_scores("salem", "fail") + 1e-9)


def test_column_profile_matches_hand(gpt2, gpt2_stats, gpt2_grads):
    m, b = gpt2
    grads = gpt2_grads[:2]  # the two fail rows
    cols = gpt2_stats.column_profile("salem", "fail")
    for blk in m.layers.blocks:
        for w in blk.mlp:
            want = np.mean([np_colmean(w, np.abs(get_path(g, w.path))) for g in grads], axis=0)
            assert cols[w.path].shape == (w.in_out_shape(get_path(m.params, w.path).shape)[1],)
            np.testing.assert_allclose(cols[w.path], want, rtol=2e-5)


def test_parameter_saliency_is_abs_per_example_grad(gpt2, gpt2_grads):
    m, b = gpt2
    small = {k: v[:2] for k, v in b.items()}
    sal = S.parameter_saliency(m, m.params, small)
    hand = gpt2_grads
    path = "transformer/wte/embedding"  # the whole pytree, not only the layer table's weights
    for i in range(2):
        np.testing.assert_allclose(np.asarray(get_path(sal, path))[i], np.abs(get_path(hand[i], path)), rtol=1e-3, atol=1e-7)
    layer = S.layer_saliency(m, S.column_saliency(m, sal))
    assert layer.shape == (2, 2)


def test_micro_batch_path_equals_one_at_a_time_and_compiles_once(gpt2, gpt2_stats, gpt2_grads):
    m, _ = gpt2
    st = gpt2_stats  # 5 rows in micro-batches of 2 (the last one padded): one compilation
    assert st.traces == 1
    groups = np.asarray(GROUPS)
    for w in st.weights:
        for gi, grp in enumerate(st.groups):
            want = np.asarray(sum(get_path(g, w.path) for g, k in zip(gpt2_grads, groups) if k == grp))
            # atol relative to the array's scale: vmapped and one-row gradients round differently;
            # jax 0.10.2 moved entries near 1e-4 by 3.7e-8 in an array whose largest entry is ~0.14
            np.testing.assert_allclose(st.grad_sums[w.path][gi], want, rtol=1e-4, atol=2e-6 * np.abs(want).max())
    # another pass of the same shapes reuses the compilation
    again = S.saliency_stats(m, m.params, (gpt2[1], GROUPS), micro_batch=2)
    assert again.traces == 0
    np.testing.assert_array_equal(again.per_example["salem"], st.per_example["salem"])


def test_seq2seq_profile_equals_hand_loop():
    m = hf.tiny("t5")
    b = encode(m, PROMPTS[:3], TARGETS[:3])
    groups = ["fail", "adapt", "pass"]
    st = S.saliency_stats(m, m.params, (b, groups), micro_batch=2)
    hand, _ = hand_scores(m, hand_grads(m, b), groups)
    assert st.layers == ("encoder.0", "encoder.1", "decoder.0", "decoder.1")
    for scorer in ("salem", "grad_x_weight", "abs_mean_grad"):
        for grp in ("fail", "pass", "overall"):
            np.testing.assert_allclose(st.layer_scores(scorer, grp), hand[scorer][grp], rtol=2e-5)


def _by_eye_model():
    """Two 'layers' with hand-chosen kernels in both layouts; only the layer table matters."""
    params = {
        "a": {"kernel": jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])},  # in_out [2 in, 3 out]
        "b": {"kernel": jnp.asarray([[1.0, 3.0], [5.0, 7.0], [0.0, 2.0]])},  # out_in [3 out, 2 in]
        "c": {"kernel": jnp.asarray([[2.0, 2.0], [4.0, 0.0]])},  # in_out
    }
    table = LayerTable(
        (
            Block("l0", mlp=(Weight("a/kernel", "in_out"), Weight("b/kernel", "out_in"))),
            Block("l1", mlp=(Weight("c/kernel", "in_out"),)),
        )
    )
    return LoadedModel("by-eye", "none", "causal", None, params, None, None, table, 8), params


def test_column_and_layer_means_by_eye():
    m, params = _by_eye_model()
    cols = S.column_saliency(m, params)
    np.testing.assert_allclose(cols["a/kernel"], [2.5, 3.5, 4.5])  # mean over the input axis 0
    np.testing.assert_allclose(cols["b/kernel"], [2.0, 6.0, 1.0])  # out_in: mean over axis 1
    np.testing.assert_allclose(cols["c/kernel"], [3.0, 1.0])
    layer = S.layer_saliency(m, cols)
    # l0: the mean of its 6 columns (3 of a, 3 of b); l1: of its 2 columns
    np.testing.assert_allclose(layer, [(2.5 + 3.5 + 4.5 + 2.0 + 6.0 + 1.0) / 6, 2.0])


def test_top_k_known_scores():
    names = ["h.0", "h.1", "h.2", "h.3"]
    assert top_k_layers([0.1, 0.5, 0.3, 0.5], names, 1) == ("h.1",)
    assert top_k_layers([0.1, 0.5, 0.3, 0.5], names, 3) == ("h.1", "h.3", "h.2")
    with pytest.raises(ValueError, match="top_k"):
        top_k_layers([0.1, 0.5, 0.3, 0.5], names, 0)
    with pytest.raises(ValueError, match="NaN"):
        top_k_layers([0.1, float("nan"), 0.3, 0.5], names, 1)


def test_lga_equals_hand_computation(gpt2, gpt2_grads):
    m, b = gpt2
    lga = S.lga_scores(m, m.params, (b, GROUPS), micro_batch=2)
    assert lga.traces == 2  # one compilation per pass

    logits = np.asarray(m.apply(m.params, {k: jnp.asarray(v) for k, v in b.items()}))
    existing = logits.argmax(-1)

    @jax.jit
    def margin_grad(p, ex, existing, d):
        def margin(p):
            logp = jax.nn.log_softmax(m.apply(p, ex)[0], -1)
            idx = jnp.arange(existing.shape[0])
            return ((logp[idx, existing] - logp[idx, ex["labels"][0]]) * d).sum() / jnp.maximum(d.sum(), 1)

        return jax.grad(margin)(p)

    grads = []
    for i, grp in enumerate(GROUPS):
        ex = {k: jnp.asarray(v[i : i + 1]) for k, v in b.items()}
        if grp == "pass":
            grads.append(gpt2_grads[i])  # the target NLL's gradient
        else:
            d = b["label_mask"][i] * (existing[i] != b["labels"][i])
            grads.append(margin_grad(m.params, ex, jnp.asarray(existing[i]), jnp.asarray(d, jnp.float32)))
    paths = {blk.name: [w.path for w in blk.mlp] for blk in m.layers.blocks}
    G = {q: sum(np.asarray(get_path(g, q)) for g, grp in zip(grads, GROUPS) if grp != "pass") for ps in paths.values() for q in ps}
    attr = np.asarray(
        [[sum((np.sign(G[q]) * np.asarray(get_path(g, q))).sum() for q in ps) for ps in paths.values()] for g in grads]
    )
    np.testing.assert_allclose(lga.attribution, attr, rtol=1e-4, atol=1e-5)
    gain = attr[:2].mean(0)
    coll = np.abs(attr[3:]).mean(0)
    np.testing.assert_allclose(lga.layer_scores("fail"), gain - coll, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lga.edit_grad_l1, [sum(np.abs(G[q]).sum() for q in ps) for ps in paths.values()], rtol=1e-5)


def test_profile_result_and_json(gpt2, gpt2_stats):
    m, b = gpt2
    prof = S.saliency_profile(m, m.params, (b, GROUPS), scorer="contrast", top_k=2, micro_batch=2)
    assert prof.extra["traces"] == 0  # the same shapes as the gpt2_stats fixture: no recompilation
    assert prof.method == "saliency" and prof.scorer == "contrast"
    assert set(prof.scores) == {"fail", "adapt", "overall"}
    assert prof.chosen == top_k_layers(prof.scores["fail"], prof.layers, 2)
    assert prof.examples == {"fail": 2, "adapt": 1, "pass": 2}
    d = json.loads(prof.to_json())
    assert LayerProfile.from_dict(d) == LayerProfile.from_dict(prof.to_dict())
    assert set(d["extra"]["scores_by_scorer"]) == {"salem", "grad_x_weight", "mean_sq", "abs_mean_grad", "contrast"}


def test_bad_input(gpt2):
    m, b = gpt2
    empty = {k: v[:0] for k, v in b.items()}
    with pytest.raises(ValueError, match="empty batch"):
        S.saliency_stats(m, m.params, empty)
    with pytest.raises(KeyError, match="unknown layer 'h.7'"):
        S.saliency_stats(m, m.params, (b, GROUPS), layers=["h.0", "h.7"])
    long = {k: np.zeros((1, m.max_length + 1), np.int32) for k in b}
    long["label_mask"][0, 3] = 1
    with pytest.raises(ValueError, match="longer than the context"):
        S.saliency_stats(m, m.params, long)
    with pytest.raises(ValueError, match="more than the model's context"):
        encode(m, ["the " * 70], ["paris"])
    no_target = {k: v[:2].copy() for k, v in b.items()}
    no_target["label_mask"][1] = 0
    with pytest.raises(ValueError, match="row 1 has no target tokens"):
        S.saliency_stats(m, m.params, no_target)
    with pytest.raises(ValueError, match="unknown scorer"):
        S.saliency_profile(m, m.params, (b, GROUPS), scorer="nope")
    with pytest.raises(ValueError, match="needs rows of group 'pass'"):
        S.lga_scores(m, m.params, ({k: v[:2] for k, v in b.items()}, ["fail", "fail"]))


# make test keeps part="all" (every kernel of the MLP case and the attention's); "mlp" alone goes to the
# slow suite (issue 14, make test <= 5 min): its kernels are a subset, and which kernels part="mlp"
# selects is checked by the profile tests of make test (test_profile_equals_hand_loop_decoder_only)
@pytest.mark.parametrize("part", [pytest.param("mlp", marks=pytest.mark.slow), "all"])
def test_factor_step_equals_per_example_gradient_step(part):
    """The one-device step from gradient factors (tiles of u^T delta, scored-position head) gives
    the per-example-gradient step's numbers: a tiny Llama (in_out kernels, attention too with
    part="all"), two batches of different lengths, micro-batches of 3 with padding, the LM head at
    K < S scored positions (rows with 1 and 2 target tokens)."""
    from salem_jax.models import llama

    m = llama.tiny_llama(hidden_size=48, intermediate_size=96)
    b1 = encode(m, PROMPTS[:4], TARGETS[:4])
    b2 = encode(m, ["a much longer prompt about " + p for p in PROMPTS[:3]], ["x y", "z", "w v"])
    data = [(b1, GROUPS[:4]), (b2, ["fail", "pass", "adapt"])]
    fast = S.saliency_stats(m, m.params, data, micro_batch=3, part=part)
    slow = S.saliency_stats(m, m.params, data, micro_batch=3, part=part, by_gradients=True)
    lengths = {b1["input_ids"].shape[1], b2["input_ids"].shape[1]}
    assert fast.traces == len(lengths) and slow.traces <= len(lengths)  # one compilation per sequence length
    for name in ("salem", "grad_x_weight", "mean_sq"):
        np.testing.assert_allclose(fast.per_example[name], slow.per_example[name], rtol=2e-5, err_msg=name)
        for p in fast.column_sums[name]:
            np.testing.assert_allclose(fast.column_sums[name][p], slow.column_sums[name][p], rtol=2e-5, atol=1e-12, err_msg=p)
    for p, g in slow.grad_sums.items():
        np.testing.assert_allclose(fast.grad_sums[p], g, rtol=1e-4, atol=2e-6 * np.abs(g).max(), err_msg=p)


def test_factor_column_stats_equal_numpy_on_a_kernel_whose_fan_in_needs_several_tiles():
    """`_factor_column_stats` against numpy's u^T delta for fan_in = 2 x 3 x 64 (tiles of 192 and
    a non-divisor-friendly 7 x 11 case): every row, every statistic."""
    rng = np.random.default_rng(0)
    for m, t, fan_in, fan_out in ((3, 5, 384, 10), (2, 4, 77, 6)):
        u = rng.normal(size=(m, t, fan_in)).astype(np.float32)
        d = rng.normal(size=(m, t, fan_out)).astype(np.float32)
        w = rng.normal(size=(fan_in, fan_out)).astype(np.float32)
        got = np.asarray(S._factor_column_stats(jnp.asarray(u), jnp.asarray(d), jnp.asarray(w)))
        g = np.einsum("mti,mto->mio", u.astype(np.float64), d)
        want = np.stack([np.abs(g).mean(1), np.abs(g * w).mean(1), (g * g).mean(1)], 1)
        np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_group_grad_sums_equal_numpy_for_mixed_single_group_and_padded_micro_batches(layout):
    """`_add_group_grad_sums` (one masked contraction per group present, added in place under
    lax.cond) against a numpy loop over rows, on a non-zero accumulator: a micro-batch with every
    group, one with a single group and padding, one of padding only (the sums unchanged)."""
    rng = np.random.default_rng(1)
    m, t, fan_in, fan_out, G = 4, 3, 7, 5, 3
    u = rng.normal(size=(m, t, fan_in)).astype(np.float32)
    d = rng.normal(size=(m, t, fan_out)).astype(np.float32)
    for groups in ([0, 1, 2, 1], [2, 2, None, None], [None] * 4):
        onehot = np.zeros((m, G), np.float32)
        for r, g in enumerate(groups):
            if g is not None:
                onehot[r, g] = 1.0
        acc = rng.normal(size=(G, fan_in, fan_out)).astype(np.float32)
        want = acc.astype(np.float64).copy()
        for r, g in enumerate(groups):
            if g is not None:
                want[g] += u[r].astype(np.float64).T @ d[r]
        if layout == "out_in":
            acc, want = acc.transpose(0, 2, 1).copy(), want.transpose(0, 2, 1)
        got = np.asarray(jax.jit(S._add_group_grad_sums, static_argnums=4)(acc, onehot, u, d, layout))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(groups))


def _out_in_model():
    """A tiny causal model whose first layer's kernel is stored [out, in] (GPT-2 Conv1D's
    layout, y = x @ W.T) and whose second is [in, out]: both layouts through the factor step."""
    import flax.linen as nn

    vocab = 11

    class OutIn(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            k = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
            return x @ k.T

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(vocab, 6, name="emb")
            h = emb(ids)
            h = jnp.cumsum(h, axis=1) / jnp.arange(1, ids.shape[1] + 1)[None, :, None]  # causal mixing
            h = jnp.tanh(OutIn(10, name="a")(h))
            h = nn.Dense(6, name="b")(h)
            return emb.attend(h)

    mod = Toy()
    params = mod.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))["params"]
    table = LayerTable((Block("l0", mlp=(Weight("a/kernel", "out_in"),)), Block("l1", mlp=(Weight("b/kernel", "in_out"),))))
    apply = lambda p, b: mod.apply({"params": p}, b["input_ids"])  # noqa: E731
    return LoadedModel("toy-out-in", "none", "causal", apply, params, None, None, table, 16)


def test_factor_step_equals_per_example_gradient_step_for_out_in_kernels():
    m = _out_in_model()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 11, size=(5, 7)).astype(np.int32)
    mask = np.zeros_like(ids)
    mask[:, 4:6] = 1
    mask[2, 6] = 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.roll(ids, -1, 1), "label_mask": mask}
    groups = ["fail", "fail", "adapt", "pass", "pass"]
    fast = S.saliency_stats(m, m.params, (batch, groups), micro_batch=2)
    slow = S.saliency_stats(m, m.params, (batch, groups), micro_batch=2, by_gradients=True)
    for name in ("salem", "grad_x_weight", "mean_sq"):
        np.testing.assert_allclose(fast.per_example[name], slow.per_example[name], rtol=2e-5, err_msg=name)
    for p, g in slow.grad_sums.items():
        assert fast.grad_sums[p].shape == g.shape
        np.testing.assert_allclose(fast.grad_sums[p], g, rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=p)
