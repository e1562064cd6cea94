"""The editor network: identity at init, running statistics, sharing, layouts, pure edits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.data.tokenize import encode
from salem_jax.mend.capture import Factors, capture, summed_nll
from salem_jax.mend.editor import (
    EditorConfig,
    EditorSpec,
    edited_params,
    init_editor,
    pseudo_grads,
    transform_factors,
    update_norm_state,
    weight_key,
)
from salem_jax.models.base import Weight, get_path, param_paths


def _spec(mode="combined", normalize=True, shapes=((8, 6), (8, 6), (6, 8))):
    weights = (Weight("a/kernel", "in_out"), Weight("b/kernel", "in_out"), Weight("c/kernel", "out_in"))
    return EditorSpec(weights, shapes, EditorConfig(rank=4, n_hidden=1, mode=mode, normalize=normalize))


def _factors(spec, seed=0, batch=2, tokens=5):
    rng = np.random.default_rng(seed)
    out = {}
    for i, w in enumerate(spec.weights):
        fi, fo = spec.fans(i)
        u = rng.normal(size=(batch, tokens, fi)).astype(np.float32)
        d = rng.normal(size=(batch, tokens, fo)).astype(np.float32)
        d[:, -1] = 0  # a padding token
        out[w.path] = Factors(jnp.asarray(u), jnp.asarray(d))
    return out


def test_one_mlp_per_shape_with_per_weight_scale_and_shift():
    spec = _spec()
    params, state = init_editor(spec, jax.random.PRNGKey(0))
    # "a" and "c" are both 8 -> 6 (c is stored [out, in] = (6, 8)); "b" too: one shared MLP.
    assert spec.shape_groups() == {"8x6": [0, 1, 2]}
    layer = params["nets"]["8x6"]["xd"]["layer0"]
    assert layer["scale"].shape == (3, 14) and layer["shift"].shape == (3, 14)
    assert np.all(layer["U"] == 0) and layer["V"].shape == (4, 14) and np.any(layer["V"] != 0)
    assert set(params["lr"]) == {weight_key(w.path) for w in spec.weights}
    assert all(float(v) == pytest.approx(1e-4) for v in params["lr"].values())
    assert [spec.mode_index(i) for i in range(3)] == [0, 1, 2]
    # rank is clamped to the layer width; several shapes give several MLPs
    spec2 = _spec(shapes=((8, 6), (3, 2), (6, 8)))
    p2, _ = init_editor(spec2, jax.random.PRNGKey(0))
    assert set(p2["nets"]) == {"8x6", "3x2"}
    assert p2["nets"]["3x2"]["xd"]["layer0"]["V"].shape == (4, 5)


@pytest.mark.parametrize("mode", ["combined", "one_sided", "x_only", "delta_only"])
def test_identity_at_init_for_every_mode(mode):
    spec = _spec(mode=mode)
    params, state = init_editor(spec, jax.random.PRNGKey(1))
    # perturb scale/shift: identity must not depend on them while U is zero
    params = jax.tree.map(lambda x: x, params)
    for net in params["nets"].values():
        for side in net.values():
            for layer in side.values():
                layer["scale"] = layer["scale"] * 3.0
                layer["shift"] = layer["shift"] + 0.5
    f = _factors(spec)
    out = transform_factors(spec, params, state, f)  # fresh statistics: no normalisation yet
    for w in spec.weights:
        keep = np.asarray(f[w.path].delta).any(-1, keepdims=True)
        np.testing.assert_array_equal(out[w.path].u, np.asarray(f[w.path].u) * keep)
        np.testing.assert_array_equal(out[w.path].delta, f[w.path].delta)


def test_modes_transform_the_right_side():
    f = None
    for mode, changed in [("x_only", "u"), ("delta_only", "delta"), ("one_sided", "delta")]:
        # one_sided: fan_in 8 > fan_out 6, so the smaller side (delta) is transformed
        spec = _spec(mode=mode, normalize=False)
        params, state = init_editor(spec, jax.random.PRNGKey(2))
        params = jax.tree.map(lambda x: x + 0.3 if x.ndim == 2 else x, params)  # U != 0 now
        f = _factors(spec)
        out = transform_factors(spec, params, state, f)["a/kernel"]
        same = "u" if changed == "delta" else "delta"
        keep = np.asarray(f["a/kernel"].delta).any(-1, keepdims=True)
        np.testing.assert_array_equal(getattr(out, same), np.asarray(getattr(f["a/kernel"], same)) * keep)
        assert not np.allclose(getattr(out, changed), getattr(f["a/kernel"], changed))


def _np_mlp(layers, x, mode):
    """The residual low-rank MLP in numpy (float64), one kernel's scale/shift row `mode`."""
    x = np.asarray(x, np.float64)
    n = len(layers)
    for j in range(n):
        p = {k: np.asarray(v, np.float64) for k, v in layers[f"layer{j}"].items()}
        h = (x * p["scale"][mode] + p["shift"][mode]) @ p["V"].T @ p["U"].T + p["b"]
        if j < n - 1:
            h = np.maximum(h, 0.0)
        x = x + h
    return x


@pytest.mark.parametrize("mode", ["combined", "one_sided", "x_only"])
def test_kernels_sharing_an_mlp_each_get_their_own_conditioning(mode):
    """transform_factors runs the kernels of one shape through their MLP together: every kernel's
    output equals that MLP applied to its rows alone with its own scale/shift row (numpy), for a
    group of two kernels and a kernel of another shape, with trained-looking (non-zero) nets."""
    spec = _spec(mode=mode, normalize=False, shapes=((8, 6), (8, 6), (3, 5)))
    assert spec.shape_groups() == {"8x6": [0, 1], "5x3": [2]}  # c is stored [out, in]
    params, state = init_editor(spec, jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(scale=0.5, size=x.shape), x.dtype), params)
    f = _factors(spec, seed=5, batch=2, tokens=4)
    out = transform_factors(spec, params, state, f)
    # the same under jit with the editor's tables as host (numpy) arrays, as a loaded editor holds them
    host = jax.tree.map(np.asarray, params)
    jitted = jax.jit(lambda g: transform_factors(spec, host, state, g))(f)
    for w in spec.weights:
        np.testing.assert_allclose(jitted[w.path].u, out[w.path].u, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(jitted[w.path].delta, out[w.path].delta, rtol=1e-6, atol=1e-6)
    for i, w in enumerate(spec.weights):
        net = params["nets"][spec.shape_key(i)]
        m = spec.mode_index(i)
        u = np.asarray(f[w.path].u).reshape(-1, f[w.path].u.shape[-1])
        d = np.asarray(f[w.path].delta).reshape(-1, f[w.path].delta.shape[-1])
        if "xd" in net:
            y = _np_mlp(net["xd"], np.concatenate([u, d], -1), m)
            u, d = y[:, : u.shape[-1]], y[:, u.shape[-1]:]
        else:
            u = _np_mlp(net["x"], u, m) if "x" in net else u
            d = _np_mlp(net["delta"], d, m) if "delta" in net else d
        keep = (np.asarray(f[w.path].u).any(-1) & np.asarray(f[w.path].delta).any(-1)).reshape(-1, 1)
        np.testing.assert_allclose(np.asarray(out[w.path].u).reshape(u.shape), u * keep, rtol=2e-4, atol=2e-4,
                                   err_msg=f"{mode} {w.path} u")
        np.testing.assert_allclose(np.asarray(out[w.path].delta).reshape(d.shape), d * keep, rtol=2e-4, atol=2e-4,
                                   err_msg=f"{mode} {w.path} delta")


def test_running_statistics_match_numpy_over_active_tokens():
    spec = _spec()
    _, state = init_editor(spec, jax.random.PRNGKey(0))
    chunks = [_factors(spec, seed=s, batch=1 + s, tokens=4) for s in range(3)]
    for f in chunks:
        state = update_norm_state(spec, state, f)
    for w in spec.weights:
        u = np.concatenate([np.asarray(f[w.path].u).reshape(-1, f[w.path].u.shape[-1]) for f in chunks])
        d = np.concatenate([np.asarray(f[w.path].delta).reshape(-1, f[w.path].delta.shape[-1]) for f in chunks])
        active = d.any(-1)
        s = state["norm"][weight_key(w.path)]
        assert float(s["count"]) == active.sum()
        np.testing.assert_allclose(s["u_mean"], u[active].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["d_mean"], d[active].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s["u_m2"] / (s["count"] - 1), u[active].var(0, ddof=1), rtol=1e-4)
        np.testing.assert_allclose(s["d_m2"] / (s["count"] - 1), d[active].var(0, ddof=1), rtol=1e-4)
    # with statistics, the identity editor outputs the standardised factors
    params, _ = init_editor(spec, jax.random.PRNGKey(0))
    f = chunks[0]
    out = transform_factors(spec, params, state, f)["a/kernel"]
    u = np.asarray(chunks[0]["a/kernel"].u)
    s = state["norm"]["a.kernel"]
    std = np.sqrt(np.asarray(s["u_m2"]) / (float(s["count"]) - 1))
    keep = np.asarray(f["a/kernel"].delta).any(-1, keepdims=True)
    np.testing.assert_allclose(out.u, (u - np.asarray(s["u_mean"])) / (std + 1e-7) * keep, rtol=1e-5, atol=1e-5)


def test_pseudo_gradient_layouts_and_batched_edits_are_sums():
    spec = _spec(normalize=False)
    params, state = init_editor(spec, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 else x, params)  # a non-identity editor
    f = _factors(spec, batch=2)
    g = pseudo_grads(spec, params, state, f)
    assert g["a/kernel"].shape == (8, 6) and g["c/kernel"].shape == (6, 8)
    # a batch of two edits = the sum of the two edits made alone (tokens are independent)
    one = [pseudo_grads(spec, params, state, {k: Factors(v.u[i : i + 1], v.delta[i : i + 1]) for k, v in f.items()}) for i in range(2)]
    for w in spec.weights:
        np.testing.assert_allclose(g[w.path], one[0][w.path] + one[1][w.path], rtol=1e-5, atol=1e-5)
    # same factors, other layout: the transpose ("c" shares a's MLP but has its own scale row)
    spec_t = EditorSpec((Weight("a/kernel", "out_in"),), ((6, 8),), spec.config)
    p_t, s_t = init_editor(spec_t, jax.random.PRNGKey(0))
    spec_n = EditorSpec((Weight("a/kernel", "in_out"),), ((8, 6),), spec.config)
    p_n, s_n = init_editor(spec_n, jax.random.PRNGKey(0))
    fa = {"a/kernel": f["a/kernel"]}
    np.testing.assert_allclose(pseudo_grads(spec_t, p_t, s_t, fa)["a/kernel"], pseudo_grads(spec_n, p_n, s_n, fa)["a/kernel"].T, rtol=1e-6)


def test_first_edit_is_a_scaled_fine_tuning_step():
    from salem_jax.models import hf

    model = hf.tiny("gpt2")
    weights = model.layers.weights(["h.1"])
    batch = encode(model, ["the capital of france is", "the capital of peru is"], ["rome", "paris"])
    cfg = EditorConfig(rank=16, edit_lr_init=1e-2)
    spec = EditorSpec.from_params(weights, model.params, cfg)
    eparams, estate = init_editor(spec, jax.random.PRNGKey(0))
    before = jax.tree.map(np.array, model.params)

    @jax.jit
    def edit(params, batch):
        _, factors = capture(model.apply, params, batch, weights)
        return edited_params(spec, eparams, estate, params, factors)

    new = edit(model.params, batch)

    # independent: the plain gradient of the same loss
    loss_fn = jax.jit(lambda p: summed_nll(model.apply(p, batch), batch))
    grads = jax.jit(jax.grad(loss_fn))(model.params)
    for w in weights:
        want = get_path(model.params, w.path) - 1e-2 * get_path(grads, w.path)
        np.testing.assert_allclose(get_path(new, w.path), want, atol=1e-7, rtol=1e-6)
    # nothing else changed, and the base parameters are bitwise what they were
    edited = {w.path for w in weights}
    for path in param_paths(model.params):
        np.testing.assert_array_equal(get_path(model.params, path), get_path(before, path))
        if path not in edited:
            np.testing.assert_array_equal(get_path(new, path), get_path(model.params, path))
    # the step goes downhill
    assert loss_fn(new) < loss_fn(model.params)


def test_spec_round_trip_and_errors():
    spec = _spec(mode="one_sided")
    assert EditorSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="mode"):
        EditorConfig(mode="both")
    with pytest.raises(ValueError, match="twice"):
        EditorSpec((Weight("a/kernel"), Weight("a/kernel")), ((2, 2), (2, 2)))
    with pytest.raises(ValueError, match="at least one"):
        EditorSpec((), ())


def test_every_layer_of_the_identity_editor_can_learn():
    """At init every pre-activation is exactly 0 (U = 0, b = 0); the hidden ReLU must still pass
    gradient there, or the hidden layers would never leave the identity."""
    spec = _spec(normalize=False)
    params, state = init_editor(spec, jax.random.PRNGKey(0))
    f = _factors(spec)
    target = {w.path: jnp.asarray(np.random.default_rng(1).normal(size=s), jnp.float32) for w, s in zip(spec.weights, spec.shapes)}

    def loss(p):
        g = pseudo_grads(spec, p, state, f)
        return sum((g[k] * target[k]).sum() for k in g)

    grads = jax.grad(loss)(params)
    for name in ("layer0", "layer1"):
        for leaf in ("U", "b"):
            assert float(jnp.abs(grads["nets"]["8x6"]["xd"][name][leaf]).max()) > 0, (name, leaf)
