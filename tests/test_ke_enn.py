"""KE and ENN baselines: their updates on a tiny BERT classifier against hand-written references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax import losses
from salem_jax.baselines import enn as E
from salem_jax.baselines import ke as K
from salem_jax.baselines.meta_data import MetaData, encode_rows
from salem_jax.models import hf
from salem_jax.models.base import get_path, set_path

TEXTS = ["red blue green", "paris rome berlin", "one two three four", "france is a country", "yellow city river",
         "tokyo lies in asia", "the capital of peru", "five yes no", "cairo egypt africa", "the euro and the yen"]


@pytest.fixture(scope="module")
def model():
    # a wider initialisation than BERT's 0.02: gradients large enough that the clipping and
    # finite-difference checks below are exercised (at 0.02 the tiny model's are ~1e-6)
    return hf.tiny("bert", num_labels=2, seed=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def model_02():
    """BERT's own initialisation (0.02): ENN's training-step reference and ENN's training run
    share it (and ENN_CFG), so the jitted ENN step compiles once for both."""
    return hf.tiny("bert", num_labels=2, seed=3)


# One configuration each for KE's and ENN's training-step references and the training runs of
# test_train_and_edit_functions_run_and_keep_the_base: the steps are cached by (model, weights,
# config), so each compiles once in this file. KE's references are jitted (one compilation, not
# one per small op); so are ENN's since make test's cheaper XLA code generation (tests/conftest.py):
# this file alone, 50.5 s -> 42.2 s user CPU.
KE_CFG = K.KEConfig(lstm_hidden=8, condition_dim=16, hidden=8, cond_length=12, lr=1e-3, grad_clip=1e-5, steps=3)
ENN_CFG = E.ENNConfig(lr=1e-4, lr_lr=1e-2, grad_clip=0.05, c_base=1.0, steps=3)


def rows(n_fail=4, n_pass=6):
    out = []
    for i, t in enumerate(TEXTS[: n_fail + n_pass]):
        g = "fail" if i < n_fail else "pass"
        out.append(dict(id=f"r{i}", record_id=f"r{i}", group=g, prompt=t, target="x", label=i % 2, text_pair=""))
    return out


def nll(model, params, batch):
    return losses.batch_nll(model.apply(params, batch), batch["labels"], batch["label_mask"])


# ----------------------------------------------------------------------------- KE


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_lstm_last(p, x, mask):
    H = p["w_hh"].shape[0]
    h, c = np.zeros(H), np.zeros(H)
    for t in range(len(x)):
        if not mask[t]:
            continue
        z = x[t] @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        i, f, g, o = np_sigmoid(z[:H]), np_sigmoid(z[H:2 * H]), np.tanh(z[2 * H:3 * H]), np_sigmoid(z[3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
    return h


def np_wn(p, x):
    v = np.asarray(p["v"], np.float64)
    w = v * (np.asarray(p["g"]) / np.sqrt((v ** 2).sum(0)))
    return x @ w + np.asarray(p["b"])


def np_ke_delta(kp, ids, mask, g_stored, path, max_scale):
    """KE's update for one weight, written out in numpy from the paper's definition."""
    kp = jax.tree.map(lambda a: np.asarray(a, np.float64), kp)
    n_real = int(mask.sum())
    x = kp["embedding"][ids]
    fw = np_lstm_last(kp["fw"], x, mask)
    # backward direction: the real tokens in reverse order
    bw = np_lstm_last(kp["bw"], x[:n_real][::-1], np.ones(n_real, bool))
    c = np.tanh(np.concatenate([fw, bw]) @ kp["cond"]["kernel"] + kp["cond"]["bias"])
    p = kp["weights"][path.replace("/", ".")]
    h = np_wn(p["l2"], np.tanh(np_wn(p["l1"], c)))
    g = np.asarray(g_stored, np.float64).T  # stored [in, out] -> [out, in]
    m, n = g.shape
    col_a, row_a, col_b, row_b, eta = h[:n], h[n:n + m], h[n + m:2 * n + m], h[2 * n + m:2 * (n + m)], h[-1]
    a = np.outer(np_softmax(row_a), col_a)
    b = np.outer(np_softmax(row_b), col_b)
    return (max_scale * np_sigmoid(eta) * (g * a + b)).T


def test_ke_update_equals_numpy_reference(model):
    weights = model.layers.weights(["layer.1"])
    cfg = K.KEConfig(lstm_hidden=8, condition_dim=16, hidden=8, cond_length=12, max_scale=0.5)
    kp = K.init_ke(model, weights, cfg)
    # perturb the biases so nothing is at its symmetric initial value
    kp = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size, dtype=jnp.float32).reshape(a.shape)), kp)
    r = rows()[:1]
    batch = encode_rows(model, r)
    ids, mask = K.encode_conditions(model, K.condition_texts(model, r), cfg.cond_length)
    assert 0 < mask[0].sum() < cfg.cond_length  # padding is exercised
    edited = jax.jit(lambda kp_, p: K.ke_edit(model.apply, kp_, p, weights, batch, ids[0], mask[0], cfg.max_scale))(
        kp, model.params)
    # reference gradient: jax.grad over the whole parameter tree, then the weight's leaf
    full_grad = jax.jit(jax.grad(lambda p: nll(model, p, batch)))(model.params)
    for w in weights:
        g = np.asarray(get_path(full_grad, w.path))
        assert np.abs(g).max() > 0
        want = np.asarray(get_path(model.params, w.path)) + np_ke_delta(kp, ids[0], mask[0], g, w.path, cfg.max_scale)
        np.testing.assert_allclose(np.asarray(get_path(edited, w.path)), want, rtol=1e-4, atol=1e-6)
    # every other leaf is untouched
    other = [k for k in jax.tree_util.tree_flatten_with_path(model.params)[0]]
    n_changed = sum(not np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(edited)))
    assert n_changed == len(weights) and len(other) > len(weights)


def adam_first_step(g, lr, eps=1e-8):
    """Adam's first update from zero moments: -lr * g / (|g| + eps) (bias-corrected)."""
    return -lr * g / (np.abs(g) + eps)


def clip(tree, max_norm):
    norm = np.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum()) for x in jax.tree.leaves(tree)))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree), norm


def test_ke_training_step_equals_hand_written_adam_step(model):
    weights = model.layers.weights(["layer.1"])
    cfg = KE_CFG
    kp = K.init_ke(model, weights, cfg)
    data = MetaData.from_rows(model, rows(), seed=0, loc_per_step=4)
    eb, lb = data.batch(0)
    i = int(data.edit_indices(0)[0])
    ids, mask = K.encode_conditions(model, K.condition_texts(model, data.edit_rows), cfg.cond_length)
    opt_state = K.make_optimizer(cfg).init(kp)
    new, _, parts = K.ke_train_step(model, kp, opt_state, weights, eb, lb, ids[i], mask[i], cfg)

    # reference: the loss written out directly, its gradient, clipping and Adam's first step by hand
    def loss(kp_):
        grads = {w.path: get_path(jax.grad(lambda p: nll(model, p, eb))(model.params), w.path) for w in weights}
        c = K.condition_vector(kp_, ids[i], mask[i])
        p = model.params
        for w in weights:
            d = K.weight_delta(kp_["weights"][K.weight_key(w.path)], c, grads[w.path].T, cfg.max_scale).T
            p = set_path(p, w.path, get_path(model.params, w.path) + d)
        base = model.apply(model.params, lb)[:, 0]
        post = model.apply(p, lb)[:, 0]
        kl = jnp.mean(jnp.sum(jax.nn.softmax(base) * (jax.nn.log_softmax(base) - jax.nn.log_softmax(post)), -1))
        return cfg.c_edit * nll(model, p, eb) + cfg.c_loc * kl

    g = jax.jit(jax.grad(loss))(kp)
    g, norm = clip(g, cfg.grad_clip)
    assert norm > cfg.grad_clip  # clipping is exercised
    want = jax.tree.map(lambda p, gg: np.asarray(p, np.float64) + adam_first_step(gg, cfg.lr), kp, g)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-7)
    assert np.isfinite(float(parts["total"]))


# ----------------------------------------------------------------------------- ENN


def test_enn_edit_equals_plain_gradient_steps(model):
    weights = model.layers.weights(["layer.0", "layer.1"])
    paths = [w.path for w in weights]
    batch = encode_rows(model, rows()[:2])
    lrs = {p: jnp.float32(0.05 * (k + 1)) for k, p in enumerate(paths)}
    got = jax.jit(lambda p_, l_: E.enn_edit(model.apply, p_, l_, paths, batch, n_steps=2))(model.params, lrs)
    # reference: a plain loop over whole-tree gradients, updating only the edited leaves
    p = model.params
    grad = jax.jit(jax.grad(lambda q: nll(model, q, batch)))  # one compilation for both steps
    for _ in range(2):
        g = grad(p)
        for path in paths:
            p = set_path(p, path, np.asarray(get_path(p, path)) - float(lrs[path]) * np.asarray(get_path(g, path)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert nll(model, got, batch) < nll(model, model.params, batch)


# ~10 s of second-order gradients and finite differences: the slow suite (make test <= 5 min);
# the ENN step itself is checked in make test against a hand-written Adam step
@pytest.mark.slow
def test_enn_second_order_gradient_matches_finite_differences(model):
    weights = model.layers.weights(["layer.1"])
    paths = tuple(w.path for w in weights)
    data = MetaData.from_rows(model, rows(), seed=1, loc_per_step=4)
    eb, lb = data.batch(0)
    cfg = E.ENNConfig(edit_lr_init=0.5)
    tr = E.init_enn(model.params, paths, cfg)
    orig = model.apply(model.params, lb)

    # jitted: one compilation each (f serves both sides of the difference); op by op the
    # second-order gradient compiled ~550 small programs (33 s of CPU against ~8 s jitted)
    @jax.jit
    def f(lr):
        t = {"params": tr["params"], "lrs": {p: lr for p in paths}}
        return E.enn_loss(t, orig, model.apply, paths, eb, lb, cfg)[0]

    # the step sizes are shared in f, so d f / d lr is the sum of the per-weight gradients
    g = jax.jit(jax.grad(lambda t: E.enn_loss(t, orig, model.apply, paths, eb, lb, cfg)[0]))(tr)
    analytic = sum(float(v) for v in g["lrs"].values())
    h = 1e-2
    numeric = (float(f(jnp.float32(0.5 + h))) - float(f(jnp.float32(0.5 - h)))) / (2 * h)
    assert abs(analytic) > 1e-4
    np.testing.assert_allclose(analytic, numeric, rtol=5e-2)
    # first order drops the path through the inner gradient: a different (and wrong) value here
    g1 = jax.jit(jax.grad(lambda t: E.enn_loss(t, orig, model.apply, paths, eb, lb,
                                               E.ENNConfig(edit_lr_init=0.5, first_order=True))[0]))(tr)
    base_leaf = paths[0]
    assert not np.allclose(np.asarray(get_path(g["params"], base_leaf)), np.asarray(get_path(g1["params"], base_leaf)))


def test_enn_training_step_equals_hand_written_adam_step(model_02):
    # BERT's own initialisation (0.02): with the wider one of `model` some of the base weights'
    # gradients come within float noise of Adam's eps, where g / (|g| + eps) is ill-conditioned
    model = model_02
    weights = model.layers.weights(["layer.1"])
    paths = tuple(w.path for w in weights)
    cfg = ENN_CFG
    data = MetaData.from_rows(model, rows(), seed=2, loc_per_step=4)
    eb, lb = data.batch(0)
    tr = E.init_enn(model.params, paths, cfg)
    opt_state = E.make_optimizer(cfg, tr).init(tr)
    new, _, _ = E.enn_train_step(model, tr, opt_state, paths, eb, lb, cfg)

    def loss(t):  # written out: one SGD inner step, then the three outer terms
        theta, lrs = t["params"], t["lrs"]
        gin = jax.grad(lambda q: nll(model, q, eb))(theta)
        edited = theta
        for p in paths:
            edited = set_path(edited, p, get_path(theta, p) - lrs[p] * get_path(gin, p))

        def kl(a, b):
            a, b = a[:, 0], b[:, 0]
            return jnp.mean(jnp.sum(jax.nn.softmax(a) * (jax.nn.log_softmax(a) - jax.nn.log_softmax(b)), -1))

        base_loc = model.apply(theta, lb)
        return (cfg.c_edit * nll(model, edited, eb) + cfg.c_loc * kl(jax.lax.stop_gradient(base_loc), model.apply(edited, lb))
                + cfg.c_base * kl(model.apply(model.params, lb), base_loc))

    g, norm = clip(jax.jit(jax.grad(loss))(tr), cfg.grad_clip)
    assert norm > cfg.grad_clip
    want_params = jax.tree.map(lambda p, gg: np.asarray(p, np.float64) + adam_first_step(gg, cfg.lr), tr["params"], g["params"])
    want_lrs = {p: float(tr["lrs"][p]) + adam_first_step(g["lrs"][p], cfg.lr_lr) for p in paths}
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-7)
    for p in paths:
        np.testing.assert_allclose(float(new["lrs"][p]), want_lrs[p], rtol=1e-5)


def test_train_and_edit_functions_run_and_keep_the_base(model, model_02):
    weights = model.layers.weights(["layer.1"])
    data = MetaData.from_rows(model, rows(), seed=0, loc_per_step=4)
    kr = K.train_ke(model, data, weights, KE_CFG, progress=False)
    # ENN on model_02 with ENN_CFG: the step compiled by the ENN training-step test
    data_02 = MetaData.from_rows(model_02, rows(), seed=0, loc_per_step=4)
    er = E.train_enn(model_02, data_02, weights, ENN_CFG, progress=False)
    r = rows()[:1]
    for m, fn in ((model, K.ke_edit_fn(model, kr)), (model_02, E.enn_edit_fn(model_02, er))):
        edited = fn(r)
        assert jax.tree.structure(edited) == jax.tree.structure(m.params)
    # ENN trained the base (theta* differs from the given model), which itself is untouched
    w = weights[0].path
    assert not np.array_equal(np.asarray(get_path(er.params, w)), np.asarray(get_path(model_02.params, w)))
    with pytest.raises(ValueError, match="one row"):
        K.ke_edit_fn(model, kr)(rows()[:2])


def test_ke_and_enn_are_registered_methods_for_classifiers_only():
    from salem_jax import methods

    assert {"ke", "enn"} <= set(methods.names())
    for name in ("ke", "enn"):
        m = methods.get(name)
        assert m.supports == frozenset({"classifier"})
        with pytest.raises(ValueError, match=f"method '{name}'.*classifier"):
            m.refuse_unsupported(hf.tiny("gpt2"))
