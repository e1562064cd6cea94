"""Training the editor on synthetic facts with a tiny GPT-2: data order, the loop, its results.

`tiny_setup()` / `trained_run()` are cached and shared with test_checkpoint, test_parallel and
test_edit_command, so the jitted step compiles once per test session.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from salem_jax import parallel, sharding
from salem_jax.data.tokenize import encode
from salem_jax.models.base import get_path, set_path
from salem_jax.mend.editor import EditorSpec
from salem_jax.mend.train import (
    TrainConfig,
    eval_step,
    evaluate,
    init_train_state,
    place_base_params,
    place_state,
    prepare_splits,
    train_batch,
    train_editor,
    train_step,
    val_batches,
)

COUNTRIES = "france germany italy spain japan peru chile egypt kenya india china canada".split()
CITIES = "paris berlin rome madrid tokyo lima santiago cairo nairobi delhi beijing ottawa brasilia".split()
PASS_PROMPTS = ("{} lies in", "{} speaks")


def _base_answers(model, prompts):
    """The base model's most likely next word (not a special token) after each prompt."""
    batch = encode(model, prompts, ["a"] * len(prompts))
    logits = np.asarray(jax.jit(model.apply)(model.params, batch))
    pos = batch["label_mask"].argmax(-1)
    scores = logits[np.arange(len(prompts)), pos]
    scores[:, :4] = -np.inf  # <pad> <unk> <s> </s>
    return [model.tokenizer.convert_ids_to_tokens(int(i)) for i in scores.argmax(-1)]


def synthetic_rows(model, countries, seed=0, tag="r"):
    """Edit-set rows (the schema of salem_jax.data.edit_set): for each country a fail row
    "the capital of X is" -> a city the base model does not predict, two adapt rephrasings with
    the same target, and pass rows whose target is the base model's own answer."""
    rng = np.random.default_rng(seed)
    fail_prompts = [f"the capital of {c} is" for c in countries]
    base = _base_answers(model, fail_prompts)
    pass_prompts = [p.format(c) for c in countries for p in PASS_PROMPTS]
    pass_targets = _base_answers(model, pass_prompts)
    rows = []
    for i, c in enumerate(countries):
        target = rng.choice([x for x in CITIES if x != base[i]])
        rid = f"{tag}:{c}"
        common = dict(record_id=rid, target=str(target), label=-1, text_pair="")
        rows.append(dict(id=f"{rid}:fail", group="fail", prompt=fail_prompts[i], **common))
        rows.append(dict(id=f"{rid}:a0", group="adapt", prompt=f"what city is the capital of {c}", **common))
        rows.append(dict(id=f"{rid}:a1", group="adapt", prompt=f"which city is the capital of {c}", **common))
    for j, (p, t) in enumerate(zip(pass_prompts, pass_targets)):
        rows.append(dict(id=f"{tag}:pass{j}", record_id=f"{tag}:pass{j}", group="pass", prompt=p, target=t, label=-1, text_pair=""))
    return rows


@functools.cache
def tiny_setup():
    """(model, data, weights, cfg, mesh): a 1-block GPT-2, 8 train / 4 val facts, 1 device."""
    from salem_jax.models import hf

    model = hf.tiny("gpt2", n_layer=1)
    # A random tiny model's next-token distribution is nearly flat, so any change flips its
    # argmaxes and "drawdown" would mean nothing. Scaling the (tied) output embedding gives it
    # confident answers, which the editor must then leave alone.
    wte = "transformer/wte/embedding"
    model = dataclasses.replace(model, params=set_path(model.params, wte, get_path(model.params, wte) * 8.0))
    data = prepare_splits(
        model, {"train": synthetic_rows(model, COUNTRIES[:8], 0, "tr"), "val": synthetic_rows(model, COUNTRIES[8:], 1, "va")}
    )
    weights = model.layers.weights(["h.0"])
    cfg = TrainConfig.tiny(batch_size=8, max_steps=100, val_every=50, checkpoint_every=25, log_every=10)
    mesh = parallel.data_mesh(jax.devices()[:1])
    return model, data, weights, cfg, mesh


def _tmpdir(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, True)
    return Path(d)


@functools.cache
def trained_run():
    """The shared training run: (result, workdir, base params copied before training, compiles)."""
    model, data, weights, cfg, mesh = tiny_setup()
    before = jax.tree.map(np.array, model.params)
    workdir = _tmpdir("salem-mend-run-")
    size = train_step._cache_size()
    result = train_editor(model, data, weights, cfg, workdir, mesh=mesh, progress=False)
    return result, workdir, before, train_step._cache_size() - size


# ---------------------------------------------------------------------------- data order


def test_batches_are_a_pure_function_of_seed_and_step():
    model, data, _, cfg, _ = tiny_setup()
    cfg = cfg.resolved(1)
    train = data["train"]
    a, b = train_batch(train, cfg, 3), train_batch(train, cfg, 3)
    for k in ("fail", "edit", "pass"):
        for key in a[k]:
            np.testing.assert_array_equal(a[k][key], b[k][key])
    assert a["fail"]["input_ids"].shape == (8, 1) + train.fail["input_ids"].shape[1:]
    assert a["edit"]["input_ids"].shape[1] == 1 + cfg.adapt_per_edit
    # one epoch (8 edits, 8 per step) visits every fail row once; epochs are reshuffled
    seen = [tuple(map(tuple, train_batch(train, cfg, s)["fail"]["input_ids"][:, 0])) for s in range(3)]
    ref = sorted(map(tuple, train.fail["input_ids"]))
    for s in seen:
        assert sorted(s) == ref
    assert len(set(seen)) > 1
    # each adapt row is a rephrasing of its group's fail row (same target tokens)
    for g in range(8):
        f_lab = a["edit"]["labels"][g, 0][a["edit"]["label_mask"][g, 0] == 1]
        for r in range(1, a["edit"]["labels"].shape[1]):
            m = a["edit"]["label_mask"][g, r] == 1
            if m.any():
                np.testing.assert_array_equal(a["edit"]["labels"][g, r][m], f_lab)


def test_validation_batches_are_fixed_and_padded():
    _, data, _, cfg, _ = tiny_setup()
    cfg = cfg.resolved(1)
    vb = val_batches(data["val"], cfg)
    assert len(vb) == 1 and vb[0]["weight"].tolist() == [1] * 4 + [0] * 4
    assert not vb[0]["fail"]["label_mask"][4:].any()


def test_prepare_splits_names_bad_rows():
    model = tiny_setup()[0]
    rows = synthetic_rows(model, COUNTRIES[:2])
    bad = [dict(r) for r in rows]
    del bad[1]["record_id"]
    with pytest.raises(KeyError, match="split 'train' row 1.*record_id"):
        prepare_splits(model, {"train": bad})
    bad = [dict(r) for r in rows]
    bad[0]["group"] = "keep"
    with pytest.raises(ValueError, match="row 0.*'group'"):
        prepare_splits(model, {"train": bad})
    with pytest.raises(ValueError, match="no 'pass' rows"):
        prepare_splits(model, {"train": [r for r in rows if r["group"] != "pass"]})


def test_config_resolution():
    cfg = TrainConfig()
    assert cfg.resolved(1).batch_size == 1 and cfg.resolved(1).accum_steps == 10
    assert cfg.resolved(8).batch_size == 8 and cfg.resolved(8).accum_steps == 2
    assert TrainConfig(batch_size=5).resolved(1).accum_steps == 2
    with pytest.raises(ValueError, match="cannot be split over 8 devices"):
        TrainConfig(batch_size=4).resolved(8)
    assert TrainConfig.from_dict(TrainConfig.tiny().to_dict()) == TrainConfig.tiny()


# ---------------------------------------------------------------------------- the run


def test_training_makes_the_edits_and_keeps_the_rest():
    model, data, weights, cfg, mesh = tiny_setup()
    result, workdir, before, compiles = trained_run()
    assert result.step == cfg.max_steps
    # compiled once: at most one new compilation for the whole run, none after the first step
    assert result.recompiles == 0 and compiles <= 1

    base = parallel.replicate(model.params, mesh)
    params = parallel.replicate(result.params, mesh)
    norm = parallel.replicate(result.norm, mesh)
    on_train = evaluate(model, result.spec, result.config, mesh, params, norm, base, data["train"])
    assert on_train["edit_acc_before"] == 0.0  # every fact was wrong before its edit
    assert on_train["fail_acc"] == 1.0 and on_train["adapt_acc"] == 1.0
    assert on_train["kl"] < 0.05, on_train
    assert on_train["pass_acc_before"] == 1.0 and on_train["drawdown"] == 0.0, on_train
    # an untrained editor does far worse (the training did the work)
    from salem_jax.mend.train import init_train_state

    fresh = init_train_state(result.spec, result.config)
    untrained = evaluate(model, result.spec, result.config, mesh, parallel.replicate(fresh["params"], mesh),
                         parallel.replicate(fresh["norm"], mesh), base, data["train"])
    assert untrained["edit_acc"] < 0.5, untrained

    # the base parameters are bitwise unchanged
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, np.asarray(b))

    # metrics.jsonl: training records every log_every steps, validation every val_every
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if r["split"] == "train"]
    val_steps = [r["step"] for r in lines if r["split"] == "val"]
    assert train_steps == list(range(cfg.log_every, cfg.max_steps + 1, cfg.log_every))
    assert val_steps == [50, 100]
    assert {"loss", "nll", "kl", "edit_acc", "drawdown", "grad_norm"} <= set(lines[0])
    assert result.best_step in val_steps and result.last_val["groups"] == 4


# the slow suite (issue 14, make test <= 5 min): compile-once over a whole train_editor run (recompiles == 0,
# one step program) stays in make test (test_mend_train.py's shared run, test_fit_length, test_mend_from_block)
@pytest.mark.slow
def test_train_and_eval_steps_trace_once_across_steps():
    """`chex.assert_max_traces`: three steps and two validations on the placed state trace the
    step and the evaluation once each (the donated state keeps its placement)."""
    model, data, weights, cfg, _ = tiny_setup()
    mesh = sharding.make_mesh(2, 1, jax.devices()[:2]) if len(jax.devices()) >= 2 else sharding.make_mesh(1, 1)
    cfg = cfg.resolved(sharding.axis_size(mesh, sharding.DATA))
    spec = EditorSpec.from_params(weights, model.params, cfg.editor)
    statics = ("apply_fn", "spec", "cfg", "mesh")
    step = jax.jit(chex.assert_max_traces(train_step.__wrapped__, n=1), static_argnames=statics, donate_argnums=(0,))
    ev = jax.jit(chex.assert_max_traces(eval_step.__wrapped__, n=1), static_argnames=statics)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh)
    state = place_state(init_train_state(spec, cfg), mesh)
    base = place_base_params(model, model.params, mesh)
    for i in range(3):
        state, m = step(state, base, sharding.shard_batch(train_batch(data["train"], cfg, i), mesh), **kw)
    assert int(state["step"]) == 3 and np.isfinite(float(m["loss"]))
    for _ in range(2):
        for b in val_batches(data["val"], cfg):
            ev(state["params"], state["norm"], base, sharding.shard_batch(b, mesh), **kw)


# ---------------------------------------------------------------------------- fast paths keep the numbers


def _without_score_pos(batch):
    return {k: ({kk: vv for kk, vv in v.items() if kk != "score_pos"} if isinstance(v, dict) else v) for k, v in batch.items()}


def test_step_and_evaluation_at_scored_positions_equal_the_full_logits():
    """The step (loss, metrics, updated editor, statistics) and the evaluation with the LM head
    at the scored positions only (and edit + pass rows in one forward pass) equal the same step
    on the full [rows, S, V] logits, the path without `score_pos`."""
    model, data, weights, cfg, _ = tiny_setup()
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    cfg = dataclasses.replace(cfg, accum_steps=1).resolved(1)
    spec = EditorSpec.from_params(weights, model.params, cfg.editor)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh)
    base = place_base_params(model, model.params, mesh)
    batches = [train_batch(data["train"], cfg, i) for i in range(2)]
    assert batches[0]["edit"]["score_pos"].shape[-1] < batches[0]["edit"]["input_ids"].shape[-1]
    runs = []
    for strip in (False, True):
        state = place_state(init_train_state(spec, cfg), mesh)
        ms = []
        for b in batches:
            state, m = train_step(state, base, sharding.shard_batch(_without_score_pos(b) if strip else b, mesh), **kw)
            ms.append(jax.device_get(m))
        vb = val_batches(data["val"], cfg)[0]
        ev = eval_step(state["params"], state["norm"], base, sharding.shard_batch(_without_score_pos(vb) if strip else vb, mesh), **kw)
        runs.append((ms, jax.device_get(state), jax.device_get(ev)))
    (ms_a, st_a, ev_a), (ms_b, st_b, ev_b) = runs
    for a, b in zip(ms_a, ms_b):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
    # The gradients themselves are compared through Adam's moments (opt_state: mu, nu) and the
    # norm statistics at the tight tolerance. The editor's parameters get a tolerance of 0.2% of
    # one Adam step (lr): m / (sqrt(v) + eps) turns a rounding-level difference in a gradient
    # near eps into a difference of a fraction of lr (seen: 1.09e-6 with XLA's optimisations off,
    # SALEM_JAX_TEST_FAST_COMPILE=1, while mu and nu agreed to 1e-6; 2.4e-6, 0.24% of lr, on 1 of
    # 5120 elements on an AVX-512 machine in session 15: the tolerance is 1% of lr).
    for part in ("opt_state", "norm", "step"):
        for a, b in zip(jax.tree.leaves(st_a[part]), jax.tree.leaves(st_b[part])):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=part)
    for a, b in zip(jax.tree.leaves(st_a["params"]), jax.tree.leaves(st_b["params"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-2 * cfg.lr, err_msg="params")
    for k in ev_a:
        np.testing.assert_allclose(ev_a[k], ev_b[k], rtol=2e-4, atol=1e-6, err_msg=k)
    assert ev_a["edit_correct"].any() or ev_a["edit_before"].any() or ev_a["pass_correct"].any()  # not all trivially False


@functools.cache
def _optax_reference(k):
    """(config, initial state, optax's MultiSteps update + apply_updates jitted) for accum_steps k:
    shared by the cases of the same k, so the reference compiles once per k."""
    import optax

    from salem_jax.mend.train import make_optimizer

    model, _, weights, cfg, _ = tiny_setup()
    cfg = dataclasses.replace(cfg, accum_steps=k, grad_clip=0.5).resolved(1)
    spec = EditorSpec.from_params(weights, model.params, cfg.editor)
    state = init_train_state(spec, cfg)
    tx = make_optimizer(cfg, state["params"])

    @jax.jit
    def ref(p, g, o):
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o

    return cfg, state, ref


@pytest.mark.parametrize("k,fused,clip_factor", [(1, False, False), (3, False, False), (1, True, False), (3, True, False),
                                                (1, True, True), (3, True, True)])
def test_optimizer_update_equals_optax_multisteps(k, fused, clip_factor):
    """`optimizer_update` = MultiSteps' update + apply_updates, step by step, with and without
    accumulation (params and every part of the optimizer state); `fused` (the step's path: the
    inner update leaf by leaf, `_fused_inner_update`; with the clip as a scalar factor too) on steps
    whose gradient is clipped and steps whose gradient is not, and the new params' norm it returns
    equals optax's."""
    import optax

    from salem_jax.mend.train import optimizer_update

    cfg, state, ref = _optax_reference(k)
    ref_p, ref_o = state["params"], state["opt_state"]
    new_p, new_o = state["params"], state["opt_state"]
    fast = jax.jit(lambda p, g, o: optimizer_update(cfg, p, g, o, with_norm=True, fused=fused, clip_factor=clip_factor))
    clipped = []
    for i in range(2 * k + 3):
        leaves, tdef = jax.tree.flatten(state["params"])
        keys = jax.random.split(jax.random.PRNGKey(i), len(leaves))
        scale = 1e-5 if i % 2 == 0 else 0.1  # the global norm below grad_clip, then above it
        grads = jax.tree.unflatten(tdef, [jax.random.normal(key, x.shape) * scale for key, x in zip(keys, leaves)])
        clipped.append(float(optax.tree.norm(grads)) > cfg.grad_clip)
        ref_p, ref_o = ref(ref_p, grads, ref_o)
        new_p, new_o, norm = fast(new_p, grads, new_o)
        for a, b in zip(jax.tree.leaves((ref_p, ref_o)), jax.tree.leaves((new_p, new_o))):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
            if fused and not clip_factor and np.size(a) > 1:  # optax's arithmetic, operation by operation
                # (a scalar leaf - the edit lrs' Adam - differed by 1.9e-5 relative with XLA's
                # optimisations on, for optax's own update in this test's two programs as well)
                np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        if int(ref_o.mini_step) == 0:  # an update was made (else the norm is not needed and 0)
            np.testing.assert_allclose(float(norm), float(optax.tree.norm(ref_p)), rtol=1e-6)
    assert any(clipped) and not all(clipped)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(state["params"])))  # it moved
    assert jax.tree.structure(new_o) == jax.tree.structure(state["opt_state"])


def test_train_editor_clips_by_factor_by_default_within_float_rounding_of_optax():
    """train_editor's default update (the clip as one factor in Adam, `clip_factor=True`) against
    optax's clip-then-Adam (`clip_factor=False`) on runs whose every step is clipped: the same
    editor and validation within float rounding after 6 steps, and the default is the factor."""
    model, data, weights, cfg, mesh = tiny_setup()
    cfg = dataclasses.replace(cfg, max_steps=6, val_every=6, checkpoint_every=6, log_every=1, grad_clip=1e-3)
    dirs = {cf: _tmpdir("salem-clip-") for cf in (None, True, False)}
    runs = {cf: train_editor(model, data, weights, cfg, dirs[cf], mesh=mesh, progress=False,
                             **({} if cf is None else {"clip_factor": cf})) for cf in dirs}
    # the default is the factor: bit-equal to asking for it
    for a, b in zip(jax.tree.leaves(runs[None].params), jax.tree.leaves(runs[True].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logs = [json.loads(x) for x in (dirs[None] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > cfg.grad_clip for r in logs if r["split"] == "train")  # every step clipped
    moved = 0
    for a, b, p0 in zip(jax.tree.leaves(runs[True].params), jax.tree.leaves(runs[False].params),
                        jax.tree.leaves(init_train_state(runs[True].spec, runs[True].config)["params"])):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        moved += int(not np.allclose(a, np.asarray(p0)))
    assert moved > 0  # the editor trained
    for k in ("loss", "edit_acc", "kl"):
        np.testing.assert_allclose(runs[True].last_val[k], runs[False].last_val[k], rtol=1e-5, atol=1e-7)


def test_validation_groups_are_spread_evenly_over_the_calls():
    """19 groups at 8 per call: 3 calls of 7 (21, not 24 scored groups); a multiple of the
    data-parallel devices; all groups in one call when they fit."""
    from types import SimpleNamespace

    from salem_jax.mend.train import eval_groups_per_call

    cfg = TrainConfig(val_groups=500)
    per = lambda n_fail, n_data=1: eval_groups_per_call(cfg, SimpleNamespace(n_fail=n_fail), n_data, limit=8)  # noqa: E731
    assert [per(19), per(16), per(17), per(5), per(19, 2), per(5, 2)] == [7, 8, 6, 5, 8, 6]
