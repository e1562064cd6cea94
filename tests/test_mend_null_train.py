"""The null-space projection inside MEND's training (`TrainConfig.null_energy`, `config.editor.null_energy`):
the editor's edit W - lr_W * P G~ in the step, the validation and every later edit, checked on tiny GPT-2
(Conv1D "out_in" kernels) and Llama ("in_out") models against numpy: the projected edit equals P applied
by hand to the unprojected pseudo-gradient, one projected training step equals a hand-written step (the
edit projected by an explicit P @ G~ matmul, the loss from the forward passes, jax.grad, the same Adam
update), energy 0 is the step without projection bit for bit, and after training an edit leaves k W
unchanged for every key k in the kept (high-energy) span. Resuming with another projection is refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import capitals_smollm2
from salem_jax import parallel, sharding
from salem_jax.losses import batch_nll, kl_divergence
from salem_jax.mend.apply import apply_each, apply_edits, encode_requests, load_editor
from salem_jax.mend.capture import capture
from salem_jax.mend.checkpoint import CheckpointMismatch
from salem_jax.mend.editor import EditorConfig, EditorSpec, edited_params, pseudo_grads, update_norm_state
from salem_jax.mend.nullspace import NULL_FILE, NullProjection, load_projections, null_projection
from salem_jax.mend.train import (TrainConfig, evaluate, flat_train_sizes, group_factors, init_train_state, optimizer_update, place_base_params,
                                  place_state, prepare_splits, train_batch, train_editor, train_step)
from salem_jax.methods.mend import mend_edit_each_fn, mend_edit_fn, with_null_projection
from salem_jax.models.base import get_path, set_path
from salem_jax.scored_logits import scored_logits
from salem_jax.testing import capital_edit_rows, noisy_editor_params, random_texts, refused_up_front, tiny_edit_model

REQS = [dict(prompt="the capital of france is", target="paris"),
        dict(prompt="the currency of japan is", target="rupee")]
COUNTRIES = "france germany italy spain japan peru chile egypt kenya india".split()
CITIES = "paris berlin rome madrid tokyo lima santiago cairo nairobi delhi".split()
ENERGY = 0.3
# GPT-2's case of each two-architecture test in the slow suite (issue 14: `make test` <= 5 min): our GPT-2
# stores its kernels [in, out] as Llama does; the [out, in] layout is checked on plain arrays below
ARCHS = [pytest.param("gpt2", marks=pytest.mark.slow), "llama"]


def _as_in_out(kernel, w) -> np.ndarray:
    k = np.asarray(kernel, np.float64)
    return k if w.layout == "in_out" else k.T


def _projection(model, weights, energy=ENERGY, seed=0, tmp=None) -> NullProjection:
    """The real projector (`null_projection`) of each kernel over random texts (one window each)."""
    return null_projection(model, model.params, weights, energy, random_texts(seed=seed), max_tokens=2000, window=32,
                           cache=tmp, progress=False)


def _kept_span(p: np.ndarray) -> np.ndarray:
    """[in, r] an orthonormal basis of the span P removes (P's eigenvalue-0 eigenvectors): the keys
    a projected edit must not move."""
    evals, evecs = np.linalg.eigh(np.asarray(p, np.float64))
    return evecs[:, evals < 0.5]


def _data(model):
    return prepare_splits(model, {"train": capital_edit_rows(COUNTRIES[:6], CITIES[:6], "tr"),
                                  "val": capital_edit_rows(COUNTRIES[6:], CITIES[6:], "va")})


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, max_steps=6, val_every=3, checkpoint_every=3, log_every=3,
                editor=EditorConfig(rank=16, n_hidden=1, edit_lr_init=1e-2))
    base.update(kw)
    return TrainConfig.tiny(**base)


# ---------------------------------------------------------------------------- the projected edit


@pytest.mark.parametrize("arch", ARCHS)
def test_projected_edit_is_P_times_the_unprojected_pseudo_gradient(arch, tmp_path):
    model = tiny_edit_model(arch)
    weights = model.layers.weights([model.layers.names()[1]])
    spec = EditorSpec.from_params(weights, model.params)
    eparams, state = noisy_editor_params(spec)
    factors = capture(model.apply, model.params, encode_requests(model, REQS), spec.weights)[1]
    proj = _projection(model, weights, tmp=tmp_path)
    # jitted (one program each; eager, each of their ops compiled as its own program)
    grads = jax.jit(pseudo_grads, static_argnums=0)(spec, eparams, state, factors)  # unprojected G~, stored layout
    edit = jax.jit(edited_params, static_argnums=0)
    got = edit(spec, eparams, state, model.params, factors, proj.projections)
    rng = np.random.default_rng(0)
    for w in weights:
        P = np.asarray(proj.projections[w.path], np.float64)
        assert 1 < np.trace(P) < len(P) - 1  # a proper subspace
        lr = float(eparams["lr"][w.path.replace("/", ".")])
        g = _as_in_out(grads[w.path], w)
        hand = _as_in_out(get_path(model.params, w.path), w) - lr * (P @ g)  # numpy: W - lr P G~
        new = _as_in_out(get_path(got, w.path), w)
        np.testing.assert_allclose(new, hand, atol=2e-6 * max(1.0, np.abs(hand).max()))
        dw = new - _as_in_out(get_path(model.params, w.path), w)
        assert np.linalg.norm(dw) > 1e-3 * np.linalg.norm(lr * g)  # the edit survives in part
        # keys in the kept span: k W' = k W (the unprojected edit moves them)
        k = rng.normal(size=(6, _kept_span(P).shape[1])) @ _kept_span(P).T
        assert np.linalg.norm(k @ (lr * g)) > 1e-2 * np.linalg.norm(k) * np.linalg.norm(lr * g)
        np.testing.assert_array_less(np.linalg.norm(k @ dw, axis=1), 1e-4 * np.linalg.norm(k, axis=1) * np.linalg.norm(lr * g))
    # without projections: the very same arithmetic as before the argument existed
    plain = edit(spec, eparams, state, model.params, factors)
    hand = jax.jit(lambda k, lr, g: (k.astype(jnp.float32) - lr * g).astype(k.dtype))
    for w in weights:
        want = hand(get_path(model.params, w.path), eparams["lr"][w.path.replace("/", ".")], grads[w.path])
        np.testing.assert_array_equal(np.asarray(get_path(plain, w.path)), np.asarray(want))


def test_projected_edit_on_both_kernel_layouts_against_numpy():
    """Our models store every kernel [in, out]; transformers' Conv1D layout [out, in] ("out_in") is
    checked on plain arrays: the edit's input side is projected in either layout."""
    from salem_jax.mend.capture import Factors
    from salem_jax.models.base import Weight

    weights = (Weight("a/kernel", "in_out"), Weight("c/kernel", "out_in"))
    spec = EditorSpec(weights, ((8, 6), (6, 8)), EditorConfig(rank=4, n_hidden=1))
    eparams, state = noisy_editor_params(spec)
    rng = np.random.default_rng(3)
    factors = {w.path: Factors(jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32),
                               jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)) for w in weights}
    q = np.linalg.qr(rng.normal(size=(8, 8)))[0][:, :3]
    P = q @ q.T  # a rank-3 projector on the 8 inputs
    base = {"a": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
            "c": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)}}
    grads = pseudo_grads(spec, eparams, state, factors)
    got = edited_params(spec, eparams, state, base, factors, {w.path: jnp.asarray(P, jnp.float32) for w in weights})
    for w in weights:
        lr = float(eparams["lr"][w.path.replace("/", ".")])
        g = _as_in_out(grads[w.path], w)
        want = _as_in_out(get_path(base, w.path), w) - lr * (P @ g)
        np.testing.assert_allclose(_as_in_out(get_path(got, w.path), w), want, atol=1e-5)
        kept = np.linalg.svd(np.eye(8) - P)[0][:, :5]  # the 5 input directions P removes
        np.testing.assert_allclose(kept.T @ (_as_in_out(get_path(got, w.path), w) - _as_in_out(get_path(base, w.path), w)),
                                   0, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        edited_params(spec, eparams, state, base, factors, {"a/kernel": jnp.asarray(P)})


# ---------------------------------------------------------------------------- one training step by hand


def _hand_step(model, spec, cfg, state, batch, projections):
    """One training step written out: capture, statistics, the edit with an explicit P @ G~ (G~ the
    unprojected pseudo-gradient), the loss from forward passes over each group's rows, jax.grad, the
    same optimiser update. Returns (loss, grad norm, new editor params)."""
    # each piece under jax.jit: the same arithmetic as eager ops, compiled as one program instead of
    # hundreds of one-op programs (the eager hand step took 19 s of this test's 31 s)
    factors = jax.jit(lambda b: group_factors(model.apply, spec, model.params, b))(batch["fail"])
    norm = jax.jit(lambda n, f: update_norm_state(spec, n, f))(state["norm"], factors)

    def group_loss(p, f, edit_b, pass_b):
        g = pseudo_grads(spec, p, norm, f)
        new = model.params
        for w in spec.weights:
            P = jnp.asarray(projections[w.path], jnp.float32)
            pg = P @ g[w.path] if w.layout == "in_out" else g[w.path] @ P  # the input side of either layout
            kern = get_path(model.params, w.path)
            new = set_path(new, w.path, (kern.astype(jnp.float32) - p["lr"][w.path.replace("/", ".")] * pg).astype(kern.dtype))
        logits, labels, mask = scored_logits(model.apply, new, edit_b)
        pass_logits, _, pass_mask = scored_logits(model.apply, new, pass_b)
        base_pass, _, _ = scored_logits(model.apply, model.params, pass_b)
        return cfg.c_fail * batch_nll(logits, labels, mask) + cfg.c_loc * kl_divergence(base_pass, pass_logits, pass_mask)

    def loss(p):
        losses = jnp.stack([group_loss(p, jax.tree.map(lambda x: x[i], factors), jax.tree.map(lambda x: x[i], batch["edit"]),
                                       jax.tree.map(lambda x: x[i], batch["pass"]))
                            for i in range(batch["weight"].shape[0])])
        return (losses * batch["weight"]).sum() / batch["weight"].sum()

    value, grads = jax.jit(jax.value_and_grad(loss))(state["params"])
    new_params, _ = jax.jit(lambda p, g, o: optimizer_update(cfg, p, g, o, fused=True, clip_factor=True))(
        state["params"], grads, state["opt_state"])
    gnorm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads))))
    return float(value), gnorm, new_params


@pytest.mark.parametrize("arch", ARCHS)
def test_projected_training_step_equals_the_hand_step(arch, tmp_path):
    model = tiny_edit_model(arch)
    weights = model.layers.weights([model.layers.names()[1]])
    cfg = _cfg(null_energy=ENERGY).resolved(1)
    spec = EditorSpec.from_params(weights, model.params, cfg.editor)
    proj = _projection(model, weights, tmp=tmp_path)
    mesh = parallel.data_mesh(jax.devices()[:1])
    data = _data(model)
    state0 = init_train_state(spec, cfg)
    # a step after a few statistics-only updates, so the editor standardises its inputs
    batch = train_batch(data["train"], cfg, 1)
    want_loss, want_gnorm, want_params = _hand_step(model, spec, cfg, jax.tree.map(jnp.asarray, state0), batch,
                                                     proj.projections)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh, clip_factor=True)
    base = place_base_params(model, model.params, mesh)
    state, m = train_step(place_state(jax.tree.map(np.array, state0), mesh), base, sharding.shard_batch(batch, mesh),
                          jax.tree.map(jnp.asarray, proj.projections), **kw)
    np.testing.assert_allclose(float(m["loss"]), want_loss, rtol=1e-4)
    np.testing.assert_allclose(float(m["grad_norm"]), want_gnorm, rtol=1e-3)
    # Adam's first update is about lr x sign(gradient): entries whose gradient is near Adam's eps
    # differ by float rounding of the two summation orders, so the tolerance is a share of lr
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3 * cfg.lr, rtol=1e-4)
    # the step's flat-head path (train_editor's on decoder-only models: the head at the target tokens
    # only) gives the same step
    flat = train_batch(data["train"], cfg, 1, flat_train_sizes(data["train"], cfg, 2))
    state_f, m_f = train_step(place_state(jax.tree.map(np.array, state0), mesh), base, sharding.shard_batch(flat, mesh),
                              jax.tree.map(jnp.asarray, proj.projections), **kw)
    np.testing.assert_allclose(float(m_f["loss"]), want_loss, rtol=1e-4)
    np.testing.assert_allclose(float(m_f["grad_norm"]), want_gnorm, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(state_f["params"]), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3 * cfg.lr, rtol=1e-4)
    # the projection changes the step: with P = I (no projection; the same compiled step) the loss
    # is another number
    eye = {k: jnp.eye(v.shape[0], dtype=jnp.float32) for k, v in proj.projections.items()}
    _, m0 = train_step(place_state(jax.tree.map(np.array, state0), mesh), base, sharding.shard_batch(batch, mesh), eye, **kw)
    assert abs(float(m0["loss"]) - want_loss) > 1e-4 * abs(want_loss)


# ---------------------------------------------------------------------------- energy 0, training, resuming


def test_energy_zero_trains_exactly_as_the_step_without_projection(tmp_path):
    """With null_energy 0 train_editor's steps are `train_step` called as before the option existed
    (no projections argument): the editor after 6 steps equal bit for bit to a hand loop of those
    calls on the same batches (train_editor's shortcuts off, so both run the plain step)."""
    model = tiny_edit_model("llama")
    weights = model.layers.weights([model.layers.names()[1]])
    data = _data(model)
    mesh = parallel.data_mesh(jax.devices()[:1])
    cfg = _cfg(null_energy=0.0)
    plain = dict(skip_unchanged_blocks=False, flat_head=False, keep_base_side=False, fit_lengths=False, flat_levels=False)
    got = train_editor(model, data, weights, cfg, tmp_path / "zero", mesh=mesh, progress=False, **plain)
    assert got.projections is None and not (tmp_path / "zero" / NULL_FILE).exists()
    rc = cfg.resolved(1)
    spec = EditorSpec.from_params(weights, model.params, rc.editor)
    state = place_state(init_train_state(spec, rc), mesh)
    base = place_base_params(model, model.params, mesh)
    for step in range(rc.max_steps):
        state, _ = train_step(state, base, sharding.shard_batch(train_batch(data["train"], rc, step), mesh),
                              apply_fn=model.apply, spec=spec, cfg=rc.step_config(), mesh=mesh, clip_factor=True)
    for a, b in zip(jax.tree.leaves((got.params, got.norm)), jax.tree.leaves((state["params"], state["norm"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a projection with energy 0 is a contradiction, refused before any step
    with pytest.raises(ValueError, match="null_energy is 0"):
        train_editor(model, data, weights, cfg, tmp_path / "bad", mesh=mesh, progress=False,
                     null_projection=_projection(model, weights, tmp=tmp_path))


@pytest.mark.parametrize("arch", ARCHS)
def test_after_training_edits_spare_the_kept_keys_and_load_editor_edits_as_trained(arch, tmp_path):
    model = tiny_edit_model(arch)
    weights = model.layers.weights([model.layers.names()[1]])
    data = _data(model)
    mesh = parallel.data_mesh(jax.devices()[:1])
    proj = _projection(model, weights, tmp=tmp_path)
    work = tmp_path / "run"
    res = train_editor(model, data, weights, _cfg(null_energy=ENERGY), work, mesh=mesh, progress=False, null_projection=proj)
    saved, energy, tokens, info = load_projections(work / NULL_FILE)
    assert energy == ENERGY and tokens == _cfg().null_tokens and list(saved) == [w.path for w in weights]
    for w in weights:
        np.testing.assert_array_equal(saved[w.path], proj.projections[w.path])
        np.testing.assert_array_equal(res.projections[w.path], proj.projections[w.path])
        assert info[w.path]["null_dim"] == proj.info[w.path]["null_dim"]
    # the run's validation edited through P too: its last figures are the projected editor's
    base = place_base_params(model, model.params, mesh)
    args = (model, res.spec, res.config, mesh, place_state(res.params, mesh), place_state(res.norm, mesh), base, data["val"])
    val = evaluate(*args, projections=jax.device_put(res.projections))
    for k in ("loss", "nll", "kl", "edit_acc", "drawdown"):
        np.testing.assert_allclose(val[k], res.last_val[k], rtol=1e-5, atol=1e-7)
    assert abs(evaluate(*args)["loss"] - res.last_val["loss"]) > 1e-4 * abs(res.last_val["loss"])
    editor = load_editor(work, model, step="latest")
    assert editor.null_energy == ENERGY
    unprojected = dataclasses.replace(editor, projections=None, null_energy=0.0)
    edited = apply_edits(model, editor, REQS[:1], progress=False)
    each = apply_each(model, editor, REQS)
    moved = apply_edits(model, unprojected, REQS[:1], progress=False)
    rng = np.random.default_rng(1)
    for w in weights:
        P = np.asarray(saved[w.path], np.float64)
        base = _as_in_out(get_path(model.params, w.path), w)
        dw = _as_in_out(get_path(edited, w.path), w) - base
        dw0 = _as_in_out(get_path(moved, w.path), w) - base
        assert np.linalg.norm(dw) > 1e-6
        np.testing.assert_allclose(dw, P @ dw0, atol=1e-5 * np.abs(dw0).max())  # the trained editor's edit, projected
        U1 = _kept_span(P)
        k = rng.normal(size=(8, U1.shape[1])) @ U1.T
        assert np.linalg.norm(k @ dw0) > 1e-2 * np.linalg.norm(k) * np.linalg.norm(dw0)  # unprojected: they move
        np.testing.assert_array_less(np.linalg.norm(k @ dw, axis=1), 1e-4 * np.linalg.norm(k, axis=1) * np.linalg.norm(dw0))
        one = _as_in_out(get_path(each[0], w.path), w) - base
        np.testing.assert_allclose(one, dw, atol=1e-5 * np.abs(dw).max())
    # the pipeline's edit functions: the editor's own projection, nothing added on top
    cfg = capitals_smollm2.get_config(tiny=True)
    edit, edit_each = mend_edit_fn(model, editor), mend_edit_each_fn(model, editor)
    info: dict = {}
    assert with_null_projection(model, cfg, weights, edit, edit_each, info, say=lambda m: None,
                                trained=editor) == (edit, edit_each)
    assert info["null_projection"]["in_training"] and info["null_projection"]["energy"] == ENERGY
    for w in weights:
        assert info["null_projection"]["kernels"][w.path]["null_dim"] == proj.info[w.path]["null_dim"]
    rows = [dict(r, group="fail", record_id="x", id=str(i), label=-1, text_pair="") for i, r in enumerate(REQS[:1])]
    via = edit(model.params, rows)
    for w in weights:
        np.testing.assert_array_equal(np.asarray(get_path(via, w.path)), np.asarray(get_path(edited, w.path)))
    cfg.eval.mend_null_energy = 0.5
    with pytest.raises(ValueError, match="mend_null_energy"):
        with_null_projection(model, cfg, weights, edit, edit_each, {}, say=lambda m: None, trained=editor)


def test_resume_needs_the_same_projection(tmp_path):
    model = tiny_edit_model("llama")
    weights = model.layers.weights([model.layers.names()[1]])
    data = _data(model)
    mesh = parallel.data_mesh(jax.devices()[:1])
    proj = _projection(model, weights, tmp=tmp_path)
    work = tmp_path / "run"
    train_editor(model, data, weights, _cfg(null_energy=ENERGY), work, mesh=mesh, progress=False, null_projection=proj,
                 stop_after=3)
    longer = dict(max_steps=9)
    with pytest.raises(CheckpointMismatch, match="null_energy"):
        train_editor(model, data, weights, _cfg(null_energy=0.1, **longer), work, mesh=mesh, progress=False,
                     null_projection=_projection(model, weights, energy=0.1, tmp=tmp_path))
    with pytest.raises(CheckpointMismatch, match="null_energy"):
        train_editor(model, data, weights, _cfg(**longer), work, mesh=mesh, progress=False)
    other = _projection(model, weights, seed=5, tmp=tmp_path)  # the same energy over other texts: another P
    with pytest.raises(CheckpointMismatch, match="null-space projector"):
        train_editor(model, data, weights, _cfg(null_energy=ENERGY, **longer), work, mesh=mesh, progress=False,
                     null_projection=other)
    res = train_editor(model, data, weights, _cfg(null_energy=ENERGY, **longer), work, mesh=mesh, progress=False,
                       null_projection=proj)
    assert res.step == 9
    # a run without the projection cannot resume it either way round
    plain = tmp_path / "plain"
    train_editor(model, data, weights, _cfg(), plain, mesh=mesh, progress=False, stop_after=3)
    with pytest.raises(CheckpointMismatch, match="null_energy"):
        train_editor(model, data, weights, _cfg(null_energy=ENERGY, **longer), plain, mesh=mesh, progress=False,
                     null_projection=proj)


@pytest.mark.parametrize("field, value", [("null_energy", 1.5), ("null_energy", -0.1), ("null_energy", float("nan")),
                                          ("null_tokens", 0), ("null_tokens", 2.5)])
def test_bad_training_energies_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value}).resolved(1)


@pytest.mark.slow  # a whole tiny pipeline (70 s on the shared 2-core machine): `make test-slow`
def test_pipeline_trains_and_evaluates_through_the_projection(tmp_path):
    from salem_jax.pipeline import run_pipeline

    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.editor.null_energy, cfg.editor.null_tokens = 0.5, 2000
    cfg.progress = False
    res = run_pipeline(cfg, tmp_path / "work")
    npj = res["methods"]["salem_edit"]["null_projection"]
    assert npj["in_training"] and npj["energy"] == 0.5
    saved, energy, tokens, _ = load_projections(tmp_path / "work" / "editor_salem_edit" / NULL_FILE)
    assert energy == 0.5 and tokens == 2000
    assert {k: v["null_dim"] for k, v in npj["kernels"].items()} == {k: int(round(np.trace(p))) for k, p in saved.items()}
    assert all(0 < v["null_dim"] < v["fan_in"] for v in npj["kernels"].values())
    # the same workdir with another energy: the editor's checkpoints refuse it
    cfg.editor.null_energy = 0.2
    with pytest.raises(CheckpointMismatch, match="null_energy"):
        run_pipeline(cfg, tmp_path / "work")


@pytest.mark.parametrize("editor_e, eval_e, tokens, match", [
    (1.5, 0.0, 2000, "config.editor.null_energy"), (0.5, 0.0, 0, "config.editor.null_tokens"),
    (0.5, 0.5, 2000, "set one of them to 0")])
def test_pipeline_refuses_bad_training_projections_up_front(editor_e, eval_e, tokens, match, tmp_path):
    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.editor.null_energy, cfg.editor.null_tokens, cfg.eval.mend_null_energy = editor_e, tokens, eval_e
    refused_up_front(cfg, tmp_path / "work", match)
