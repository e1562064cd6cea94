"""Our Flax Llama against transformers' PyTorch LlamaForCausalLM on tiny random configs."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salem_jax.models import llama
from salem_jax.models.base import get_path, param_paths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _random_params(config, seed=0, scale=0.2):
    """Weights large enough that attention and rotary positions matter to the logits (the
    default 0.02 init leaves them nearly invisible); norm weights away from 1."""
    params = llama.init_params(config, seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.RandomState(seed)
    new = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            new.append(jnp.asarray(1.0 + 0.3 * rng.randn(*x.shape), jnp.float32))
        else:
            new.append(jnp.asarray(scale * rng.randn(*x.shape), jnp.float32))
    return jax.tree_util.tree_unflatten(tree, new)


def _torch_model(config, params):
    cfg = config.__class__.from_dict(config.to_dict())
    cfg._attn_implementation = "eager"
    pt = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: torch.tensor(v) for k, v in llama.params_to_hf(params, config).items()}
    missing, unexpected = pt.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return pt


def _torch_logits(pt, ids, mask):
    with torch.no_grad():
        return pt(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


def _batch(vocab=128, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, vocab, (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


CASES = {
    "tied-gqa-theta1e5": dict(tie_word_embeddings=True, rope_theta=1e5),
    "untied-gqa-theta1e4": dict(tie_word_embeddings=False, rope_theta=1e4),
    "mha-bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, rope_theta=5e5),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3-rope": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "head-dim-gelu": dict(head_dim=8, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_pytorch(case):
    config = llama.tiny_config(**CASES[case])
    params = _random_params(config, seed=1)
    model = llama.from_params("t", config, params)
    ids, mask = _batch()
    ours = np.asarray(model.apply(params, {"input_ids": ids, "attention_mask": mask}))
    ref = _torch_logits(_torch_model(config, params), ids, mask)
    assert ours.shape == ref.shape == (3, 11, config.vocab_size)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() < 1e-4
    # Pad positions see the real tokens before them in both implementations.
    assert np.abs(ours - ref).max() < 1e-4


def test_rope_theta_and_positions_matter():
    """The equivalence test above could not pass by accident: changing rope_theta or
    dropping the padding mask changes the logits far beyond its tolerance."""
    config = llama.tiny_config(rope_theta=1e5)
    params = _random_params(config, seed=2)
    ids, mask = _batch()
    apply = llama.from_params("t", config, params).apply
    ours = np.asarray(apply(params, {"input_ids": ids, "attention_mask": mask}))
    other = llama.tiny_config(rope_theta=1e4)
    theirs = _torch_logits(_torch_model(other, params), ids, mask)
    assert np.abs(ours - theirs).max() > 1e-2
    # Row 1 padded vs the same row with its padding visible: real positions identical
    # (causal), the pad positions differ.
    full = np.ones_like(mask)
    ours_full = np.asarray(apply(params, {"input_ids": ids, "attention_mask": full}))
    assert np.abs(ours_full[mask == 1] - ours[mask == 1]).max() < 1e-5
    assert np.abs(ours_full[mask == 0] - ours[mask == 0]).max() > 1e-3


def test_padded_row_equals_unpadded_row():
    m = llama.tiny_llama(seed=3)
    ids, mask = _batch()
    apply = m.apply
    batch_logits = np.asarray(apply(m.params, {"input_ids": ids, "attention_mask": mask}))
    n = int(mask[2].sum())
    alone = np.asarray(apply(m.params, {"input_ids": ids[2:3, :n], "attention_mask": mask[2:3, :n]}))
    assert np.abs(batch_logits[2, :n] - alone[0]).max() < 1e-5


def test_fully_masked_row_is_finite():
    m = llama.tiny_llama()
    ids, mask = _batch()
    mask[0] = 0
    logits = m.apply(m.params, {"input_ids": ids, "attention_mask": mask})
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"attention_bias": True, "mlp_bias": True}])
def test_param_shapes_equal_traced_shapes(overrides):
    config = llama.tiny_config(**overrides)
    abstract = llama.abstract_params(config)
    traced = {p: tuple(x.shape) for p, x in zip(param_paths(abstract), jax.tree_util.tree_leaves(abstract))}
    assert traced == llama.param_shapes(config)


def test_paths_layer_table_and_tying():
    tied = llama.tiny_llama(tie_word_embeddings=True)
    untied = llama.tiny_llama(tie_word_embeddings=False)
    assert "lm_head" not in tied.params and "lm_head" in untied.params
    assert get_path(tied.params, "model/layers/1/self_attn/q_proj/kernel").shape == (64, 64)
    assert get_path(tied.params, "model/layers/1/self_attn/k_proj/kernel").shape == (64, 32)  # 2 kv heads x 16
    assert get_path(tied.params, "model/layers/0/mlp/down_proj/kernel").shape == (128, 64)
    assert tied.layers.names() == ["layers.0", "layers.1"]
    assert tied.layers["layers.1"].module_path == "model/layers/1"
    assert [w.path for w in tied.layers["layers.0"].mlp] == [
        f"model/layers/0/mlp/{n}_proj/kernel" for n in ("gate", "up", "down")
    ]
    assert tied.layers.embedding == "model/embed_tokens"
    tied.layers.check(tied.params)
    assert tied.max_length == 128 and tied.kind == "causal" and tied.arch == "llama"


def test_intercept_sees_every_projection_by_path():
    m = llama.tiny_llama(tie_word_embeddings=False)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    ids, mask = _batch()
    with nn.intercept_methods(record):
        m.apply(m.params, {"input_ids": ids, "attention_mask": mask})
    expected = {w.module_path for w in m.layers.weights(part="all")} | {"lm_head"}
    assert set(seen) == expected and len(seen) == len(expected)


def test_intercepted_perturbation_gives_kernel_gradient():
    """The rank-1 trick the editor relies on works on our Dense modules: the gradient of a
    zero perturbation added to a layer's output, contracted with the layer's input, equals the
    kernel gradient."""
    m = llama.tiny_llama(seed=4)
    target = "model/layers/1/mlp/down_proj"
    ids, mask = _batch()
    batch = {"input_ids": ids, "attention_mask": mask}

    def loss_with(params, pert):
        store = {}

        def hook(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if "/".join(context.module.path) == target and context.method_name == "__call__":
                store["u"] = args[0]
                return out + pert
            return out

        with nn.intercept_methods(hook):
            logits = m.apply(params, batch)
        return jax.nn.log_softmax(logits)[..., 5].sum(), store["u"]

    pert = jnp.zeros((3, 11, 64))
    delta, u = jax.grad(loss_with, argnums=1, has_aux=True)(m.params, pert)
    kgrad = jax.grad(lambda p: loss_with(p, pert)[0])(m.params)
    want = get_path(kgrad, target + "/kernel")
    got = jnp.einsum("bti,btj->ij", u, delta)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_remat_gradients_equal_and_finite_with_a_fully_masked_row():
    m = llama.tiny_llama(seed=5)
    r = llama.tiny_llama(seed=5, remat=True)
    ids, mask = _batch()
    mask[0] = 0  # a row with no visible key must not put NaN into the gradients
    batch = {"input_ids": ids, "attention_mask": mask}

    def loss(model, p):
        return model.apply(p, batch)[..., 7].sum()

    g1 = jax.grad(lambda p: loss(m, p))(m.params)
    g2 = jax.grad(lambda p: loss(r, p))(m.params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_unsupported_configs_raise_clearly():
    with pytest.raises(NotImplementedError, match="yarn"):
        llama.tiny_llama(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="vocab_size"):
        llama.tiny_llama(vocab_size=16)
    cfg = llama.tiny_config()
    with pytest.raises(ValueError, match="down_proj"):
        bad = jax.tree_util.tree_map(lambda x: x, llama.init_params(cfg))
        bad["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"] = jnp.zeros((3, 3))
        llama.from_params("bad", cfg, bad)


# ----------------------------------------------------------------------------- folders


def test_save_folder_opens_in_transformers_and_round_trips(tmp_path):
    m = llama.tiny_llama(seed=6, tie_word_embeddings=False)
    params = _random_params(m.config, seed=6)
    out = llama.save_llama_folder(m, params, tmp_path / "tiny")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ids, mask = _batch()
    pt = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = _torch_logits(pt, ids, mask)
    ours = np.asarray(m.apply(params, {"input_ids": ids, "attention_mask": mask}))
    assert np.abs(ours - ref).max() < 1e-4

    back = llama.load_llama_folder(out)
    for p in param_paths(params):
        np.testing.assert_array_equal(np.asarray(get_path(back.params, p)), np.asarray(get_path(params, p)))
    assert back.tokenizer("paris is").input_ids == m.tokenizer("paris is").input_ids
    bf = llama.load_llama_folder(out, dtype="bfloat16")  # parameters and computation in bfloat16
    assert get_path(bf.params, "model/layers/0/mlp/up_proj/kernel").dtype == jnp.bfloat16
    bf_logits = bf.apply(bf.params, {"input_ids": ids, "attention_mask": mask})
    assert bf_logits.dtype == jnp.float32  # logits come back float32 for the losses
    assert np.abs(np.asarray(bf_logits) - ours).max() < 0.15 * np.abs(ours).max()
    # Saving again over the folder replaces it whole (no leftover temp folders).
    llama.save_llama_folder(m, m.params, out)
    again = llama.load_llama_folder(out)
    np.testing.assert_array_equal(
        np.asarray(again.params["lm_head"]["kernel"]), np.asarray(m.params["lm_head"]["kernel"])
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_load_tied_folder_saved_by_transformers(tmp_path):
    """Sharded safetensors (with index), bfloat16 tensors and pytorch_model.bin all load."""
    config = llama.tiny_config(tie_word_embeddings=True)
    params = _random_params(config, seed=7)
    pt = _torch_model(config, params)
    ids, mask = _batch()
    ref = _torch_logits(pt, ids, mask)

    pt.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = llama.load_llama_folder(tmp_path / "sharded")
    assert loaded.tokenizer is None
    logits = np.asarray(loaded.apply(loaded.params, {"input_ids": ids, "attention_mask": mask}))
    assert np.abs(logits - ref).max() < 1e-4

    pt.save_pretrained(tmp_path / "bin", safe_serialization=False)
    from_bin = llama.load_llama_folder(tmp_path / "bin")
    np.testing.assert_array_equal(
        np.asarray(from_bin.params["model"]["norm"]["weight"]), np.asarray(params["model"]["norm"]["weight"])
    )

    pt.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    from_bf16 = llama.load_llama_folder(tmp_path / "bf16")
    k = np.asarray(from_bf16.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    want = pt.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(k, want)
    assert k.dtype == np.float32


def test_folder_errors_name_file_and_key(tmp_path):
    m = llama.tiny_llama()
    out = llama.save_llama_folder(m, m.params, tmp_path / "m")
    from safetensors.numpy import load_file, save_file

    sd = load_file(out / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, out / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        llama.load_llama_folder(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type"):
        llama.load_llama_folder(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.load_llama_folder(tmp_path / "nowhere")
