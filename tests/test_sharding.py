"""Sharded parameters on a simulated 2x4 mesh: every weight is really split, and saliency, an
editor step, editing and evaluation give the one-device numbers (computed independently on an
unsharded copy of the same model)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from salem_jax import parallel, sharding
from salem_jax.eval.metrics import compare_rows
from salem_jax.mend.apply import TrainedEditor, apply_edits
from salem_jax.mend.editor import EditorSpec
from salem_jax.mend.train import (
    TrainConfig,
    evaluate,
    init_train_state,
    place_base_params,
    place_state,
    prepare_splits,
    train_batch,
    train_editor,
    train_step,
)
from salem_jax.models import hf, llama
from salem_jax.saliency import lower_step, saliency_stats
from salem_jax.testing import capital_edit_rows

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)")

MIN = 2**12  # sharding.param_specs' default min_size


def _tiny_llama(**overrides):
    """`llama.tiny_llama(**overrides)` with its parameters initialised by one jitted call
    (op-by-op initialisation compiles every small op on its own: twice as slow here)."""
    from salem_jax.testing import tiny_tokenizer

    cfg = llama.tiny_config(**overrides)
    return llama.from_params("tiny-llama", cfg, jax.jit(lambda: llama.init_params(cfg))(), tiny_tokenizer())


@functools.cache
def medium():
    """A 2-layer Llama of width 64, MLP 256, vocab 128: its embedding, MLP, q and o matrices
    (>= 4096 entries, every axis divisible by 8) are split; k, v (64 x 32) and norms are not."""
    return _tiny_llama(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@functools.cache
def mesh24():
    return sharding.make_mesh(2, 4)


@functools.cache
def placed():
    m = medium()
    return sharding.shard_params(m.params, mesh24(), model=m)


def _path(kp):
    return jax.tree_util.keystr(kp, simple=True, separator="/")


# ----------------------------------------------------------------------------- placement


def test_make_mesh():
    m = sharding.make_mesh(2, 4)
    assert dict(m.shape) == {"data": 2, "model": 4}
    assert dict(sharding.make_mesh().shape) == {"data": len(jax.devices()), "model": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(3, 2)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(model=3)


def test_medium_model_is_split_eight_ways():
    params, total = placed(), 0
    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        shards = x.addressable_shards
        assert len(shards) == 8
        if x.size >= MIN:  # every large matrix: each device holds exactly 1/8 of it
            assert {s.data.nbytes for s in shards} == {x.nbytes // 8}, _path(kp)
            assert len({tuple((i.start, i.stop) for i in s.index) for s in shards}) == 8, _path(kp)  # eight different pieces
        total += x.nbytes
        # the pieces put back together are the original
        np.testing.assert_array_equal(np.asarray(x), np.asarray(sharding.get_path(medium().params, _path(kp))))
    info = sharding.describe(params)
    assert info.total_bytes == total and info.n_devices == 8
    assert info.max_device_bytes <= total / 8 + info.replicated_bytes
    assert all(x.size < MIN for x in (sharding.get_path(params, p) for p in info.replicated))
    # MLPs tensor parallel: the hidden axis over "model", the other over "data"
    specs = sharding.param_specs(medium().params, mesh24(), model=medium())
    assert sharding.get_path(specs, "model/layers/0/mlp/up_proj/kernel") == P("data", "model")
    assert sharding.get_path(specs, "model/layers/0/mlp/down_proj/kernel") == P("model", "data")
    assert sharding.get_path(specs, "model/embed_tokens/embedding") == P(("data", "model"), None)


WIDE = {
    "gpt2": dict(n_embd=64),
    "gpt_neo": dict(hidden_size=64, intermediate_size=256),
    "t5": dict(d_model=64, d_ff=256, d_kv=32),
    "bart": dict(d_model=64, encoder_ffn_dim=256, decoder_ffn_dim=256),
    "bert": dict(hidden_size=64, intermediate_size=256),
}


def _abstract_tiny(arch, **overrides):
    """`hf.tiny(arch, **overrides)` with abstract parameters (jax.ShapeDtypeStruct leaves from
    jax.eval_shape of the same initialisation): the placement rules read shapes only, and
    initialising the values op by op compiled every small op (about 30 s for the five here)."""
    cfg = hf._tiny_config(arch, 128, overrides)
    params = jax.eval_shape(lambda: hf.init_params(arch, cfg, 0))
    return hf.from_params(f"tiny-{arch}", arch, cfg, params)


@pytest.mark.parametrize("arch", sorted(WIDE) + ["llama"])
def test_every_architecture_has_every_large_weight_split(arch):
    m = medium() if arch == "llama" else _abstract_tiny(arch, **WIDE[arch])
    for tp, mesh in ((True, mesh24()), (False, sharding.make_mesh(8, 1))):
        specs = sharding.param_specs(m.params, mesh, model=m, tensor_parallel=tp)
        large = 0
        for (kp, x), spec in zip(jax.tree_util.tree_flatten_with_path(m.params)[0], jax.tree.leaves(
                specs, is_leaf=lambda s: isinstance(s, P))):
            if x.size < MIN:
                continue
            large += 1
            ways = math.prod(math.prod(mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,)))
                             for ax in spec if ax is not None)
            assert ways == 8, (arch, _path(kp), x.shape, spec)
        assert large >= 4, arch  # the test saw the model's matrices
    mlp = m.layers.blocks[0].mlp
    hidden_axes = sharding.param_specs(m.params, mesh24(), model=m)
    assert "model" in sharding.get_path(hidden_axes, mlp[0].path) and "model" in sharding.get_path(hidden_axes, mlp[-1].path)


def test_rules_come_first_and_must_match():
    m = medium()
    specs = sharding.param_specs(m.params, mesh24(), model=m, rules=[(r"embed_tokens", P(None, None))])
    assert sharding.get_path(specs, "model/embed_tokens/embedding") == P(None, None)
    with pytest.raises(ValueError, match="matched no parameter.*lm_head"):
        sharding.param_specs(m.params, mesh24(), model=m, rules=[(r"lm_head", P("data"))])
    with pytest.raises(ValueError, match="needs model="):
        sharding.param_specs(m.params, mesh24())


def test_host_local_batch_and_fetch_on_one_process():
    mesh = mesh24()
    x = {"ids": np.arange(24).reshape(8, 3)}
    assert parallel.process_rows(8, mesh) == slice(0, 8)
    a = parallel.host_local_batch(x, mesh)
    b = parallel.shard_batch(x, mesh)
    assert a["ids"].sharding.is_equivalent_to(b["ids"].sharding, 2)
    np.testing.assert_array_equal(parallel.fetch(a)["ids"], x["ids"])
    with pytest.raises(ValueError, match="cannot be split over 2"):
        parallel.process_rows(7, mesh)


# ----------------------------------------------------------------------------- same numbers


def _close(actual, desired, msg=""):
    """Equal up to float32 summation order: relative 1e-4, absolute 1e-5 of the array's scale."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-5 * float(np.abs(desired).max()), err_msg=msg)


def _batch(m):
    from salem_jax.data.tokenize import encode

    prompts = ["the capital of france is", "the capital of peru is", "which city is the capital of chile", "egypt lies in"]
    return encode(m, prompts, ["paris", "lima", "santiago", "africa"])


def _planned_peak(lowered) -> int:
    """XLA's planned bytes per device (arguments + outputs + temporaries - donated)."""
    a = lowered.compile().memory_analysis()
    return a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes - a.alias_size_in_bytes


def test_saliency_sharded_equals_one_device():
    m = medium()
    batch = (_batch(m), ["fail", "fail", "adapt", "pass"])
    one = saliency_stats(m, m.params, batch, micro_batch=2)
    eight = saliency_stats(m, placed(), batch, micro_batch=2)
    assert eight.traces <= 1  # compiles once, the donated state keeps its placement
    # per device, the step plans a fraction of the one-device memory (ideal 1/8: parameters,
    # gradient sums and per-example gradients all split; measured 0.15, the rest is small
    # replicated buffers and the transient all-gather of weights)
    mb = {k: v[:2] for k, v in batch[0].items()}
    ratio = _planned_peak(lower_step(m, placed(), mb)) / _planned_peak(lower_step(m, m.params, mb))
    assert ratio < 0.3, ratio
    for k in one.per_example:
        _close(eight.per_example[k], one.per_example[k], k)
        for p in one.column_sums[k]:
            _close(eight.column_sums[k][p], one.column_sums[k][p], f"{k} {p}")
    assert max(float(np.abs(v).max()) for v in one.grad_sums.values()) > 1e-4  # not a trivial comparison
    for p in one.grad_sums:
        _close(eight.grad_sums[p], one.grad_sums[p], p)


COUNTRIES = "france germany italy spain japan peru".split()
CITIES = "paris berlin rome madrid tokyo lima".split()


_rows = capital_edit_rows


@functools.cache
def edit_setup():
    """One block of the medium model (the editor tests compile whole training steps), 4 train
    and 2 validation facts, 2 groups per step (one per "data" row of the mesh)."""
    m = _tiny_llama(hidden_size=64, intermediate_size=256, num_hidden_layers=1)
    data = prepare_splits(m, {"train": _rows(COUNTRIES[:4], CITIES[:4], "tr"), "val": _rows(COUNTRIES[4:], CITIES[4:], "va")})
    cfg = TrainConfig.tiny(batch_size=2, effective_batch=2, max_steps=2, val_every=2, checkpoint_every=2, log_every=1)
    spec = EditorSpec.from_params(m.layers.weights(["layers.0"]), m.params, cfg.editor)
    return m, data, cfg.resolved(2), spec


def _adam_mu(opt_state):
    return {jax.tree_util.keystr(p): np.asarray(x) for _, mu in optax.tree_utils.tree_get_all_with_path(opt_state, "mu")
            for p, x in jax.tree_util.tree_flatten_with_path(mu)[0]}


def test_editor_step_sharded_equals_one_device():
    m, data, cfg, spec = edit_setup()
    batch = train_batch(data["train"], cfg, 0)
    kw = dict(apply_fn=m.apply, spec=spec, cfg=cfg.step_config())
    # one device
    mesh1 = parallel.data_mesh(jax.devices()[:1])
    s1, m1 = train_step(parallel.replicate(init_train_state(spec, cfg), mesh1), parallel.replicate(m.params, mesh1),
                        parallel.shard_batch(batch, mesh1), mesh=mesh1, **kw)
    # 2 x 4: base parameters split, groups over "data"
    mesh = mesh24()
    base = place_base_params(m, m.params, mesh)
    info = sharding.describe(base)
    assert info.max_device_bytes <= info.total_bytes / 8 + info.replicated_bytes < info.total_bytes / 4
    state = place_state(init_train_state(spec, cfg), mesh)
    s8, m8 = train_step(state, base, parallel.shard_batch(batch, mesh), mesh=mesh, **kw)
    s1, m1, s8, m8 = jax.device_get((s1, m1, s8, m8))
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1["norm"]), jax.tree.leaves(s8["norm"])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    g1, g8 = _adam_mu(s1["opt_state"]), _adam_mu(s8["opt_state"])
    assert g1.keys() == g8.keys() and max(float(np.abs(g).max()) for g in g1.values()) > 1e-5
    for k in g1:
        np.testing.assert_allclose(g8[k], g1[k], rtol=1e-4, atol=1e-8, err_msg=k)
    # per device, the step plans a fraction of the one-device memory: base params, editor
    # gradients and optimizer state split (measured 0.28 here; 0.64 with everything of the
    # editor replicated)
    ratio = _planned_peak(train_step.lower(place_state(init_train_state(spec, cfg), mesh), base,
                                                   parallel.shard_batch(batch, mesh), mesh=mesh, **kw))
    ratio /= _planned_peak(train_step.lower(parallel.replicate(init_train_state(spec, cfg), mesh1), parallel.replicate(m.params, mesh1),
                                            parallel.shard_batch(batch, mesh1), mesh=mesh1, **kw))
    assert ratio < 0.4, ratio
    # the step's output keeps the input's placement: a second step does not compile again
    size = train_step._cache_size()
    state = place_state(init_train_state(spec, cfg), mesh)
    for step in range(2):
        state, _ = train_step(state, base, parallel.shard_batch(train_batch(data["train"], cfg, step), mesh), mesh=mesh, **kw)
    assert train_step._cache_size() == size


def test_editing_and_evaluation_sharded_equal_one_device():
    m, data, cfg, spec = edit_setup()
    fresh = init_train_state(spec, cfg)  # identity editor: its edits are one scaled gradient step
    # the editor's validation on the 2x4 mesh equals the one-device evaluation
    mesh, mesh1 = mesh24(), parallel.data_mesh(jax.devices()[:1])
    rep1 = lambda t: parallel.replicate(t, mesh1)  # noqa: E731
    v1 = evaluate(m, spec, cfg, mesh1, rep1(fresh["params"]), rep1(fresh["norm"]), rep1(m.params), data["val"])
    base8 = place_base_params(m, m.params, mesh)
    rep8 = lambda t: sharding.replicate(t, mesh)  # noqa: E731
    v8 = evaluate(m, spec, cfg, mesh, rep8(fresh["params"]), rep8(fresh["norm"]), base8, data["val"])
    assert v1["groups"] == 2 and v1["kl"] > 0
    for k, v in v1.items():
        np.testing.assert_allclose(v8[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    # applying the editor to sharded parameters edits the same kernels, and keeps them sharded
    ed = TrainedEditor(spec=spec, params=fresh["params"], state=fresh["norm"], model_name=m.name, step=0)
    reqs = [("the capital of kenya is", "nairobi"), ("the capital of india is", "delhi")]
    new1 = apply_edits(m, ed, reqs, progress=False)
    new8 = apply_edits(m, ed, reqs, params=base8, progress=False)
    for w in spec.weights:
        k8 = sharding.get_path(new8, w.path)
        assert len(k8.sharding.device_set) == 8 and not k8.sharding.is_fully_replicated
        _close(np.asarray(k8), np.asarray(sharding.get_path(new1, w.path)), w.path)
    changed = max(float(np.abs(np.asarray(sharding.get_path(new1, w.path)) - np.asarray(sharding.get_path(m.params, w.path))).max())
                  for w in spec.weights)
    assert changed > 1e-6
    # edit metrics with sharded base and edited parameters
    rows = [dict(prompt=p, target=t) for p, t in reqs] + [dict(prompt="egypt lies in", target="africa")]
    c1 = compare_rows(m, m.params, new1, rows, batch_size=4, progress=False)
    c8 = compare_rows(m, base8, new8, rows, batch_size=4, progress=False)
    for k in c1:
        np.testing.assert_allclose(c8[k], c1[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_train_editor_on_a_2x4_mesh(tmp_path):
    """The whole loop on a (data, model) mesh: compiles once, validates, checkpoints, resumes."""
    m, data, cfg, spec = edit_setup()
    res = train_editor(m, data, spec, cfg, tmp_path, mesh=mesh24(), progress=False)
    assert res.step == cfg.max_steps and res.recompiles == 0 and res.last_val["groups"] == 2
    more = train_editor(m, data, spec, dataclasses.replace(cfg, max_steps=3), tmp_path, mesh=mesh24(), progress=False)
    assert more.step == 3 and more.recompiles == 0
