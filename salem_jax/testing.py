"""Tiny things for tests and `tiny` experiment configs: a word-level tokenizer built in code.

Real tokenizers come from the model folders; tests must not need any file or network.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

import numpy as np

DEFAULT_WORDS = (
    "the capital of is what city country river language currency in a which lies on "
    "france paris germany berlin italy rome spain madrid japan tokyo peru lima chile santiago "
    "egypt cairo kenya nairobi india delhi china beijing canada ottawa brazil brasilia "
    "red blue green yellow one two three four five yes no true false entailment contradiction "
    "neutral supports refutes and or not it was he she they his her born city speaks speak "
    "europe asia africa america euro yen rupee dollar question answer claim"
).split()


def tiny_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, seq2seq: bool = False):
    """A `PreTrainedTokenizerFast` over whitespace-separated lower-case words.

    Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, then `words` in order. Causal models get a BOS
    (`<s>`) before each text; with `seq2seq=True` an EOS (`</s>`) is appended instead, like T5.
    """
    # heavy (seconds) and only for models built in tests or tiny configs: imported when one is
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if seq2seq:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@functools.lru_cache(maxsize=None)
def tiny_edit_model(arch: str):
    """The tiny model the locate-then-edit tests (ROME, r-ROME, MEMIT, EMMET, AlphaEdit) edit:
    GPT-2 ("gpt2": Conv1D "out_in" kernels) or Llama (anything else: "in_out", no bias), seed 2.
    Built once per process (building takes seconds); callers never change it in place."""
    # The model modules import this module's tokenizer, so they are imported here, not at the top.
    if arch == "gpt2":
        from salem_jax.models import hf

        return hf.tiny("gpt2", seed=2)
    from salem_jax.models.llama import tiny_llama

    return tiny_llama(seed=2)


def random_texts(n: int = 24, words: int = 14, seed: int = 0) -> list[str]:
    """`n` texts of `words` words drawn from DEFAULT_WORDS with `seed` (key statistics, fluency)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(DEFAULT_WORDS, size=words)) for _ in range(n)]


def capital_edit_rows(countries: Iterable[str], cities: Iterable[str], tag: str) -> list[dict]:
    """Edit-set rows for editor tests: per (country, city) a fail row, two adapt rephrasings and
    two pass rows (record ids prefixed with `tag`, e.g. "tr" / "va" for the splits). What they
    say does not matter to tests that compare two paths on the same rows; no model is called."""
    rows = []
    for c, city in zip(countries, cities):
        common = dict(record_id=f"{tag}:{c}", target=city, label=-1, text_pair="")
        rows.append(dict(id=f"{tag}:{c}:fail", group="fail", prompt=f"the capital of {c} is", **common))
        rows.append(dict(id=f"{tag}:{c}:a0", group="adapt", prompt=f"what city is the capital of {c}", **common))
        rows.append(dict(id=f"{tag}:{c}:a1", group="adapt", prompt=f"which city is the capital of {c}", **common))
        for j, (p, t) in enumerate((("{} lies in", "europe"), ("{} speaks", "euro"))):
            rows.append(dict(id=f"{tag}:{c}:p{j}", record_id=f"{tag}:{c}:p{j}", group="pass", prompt=p.format(c), target=t,
                             label=-1, text_pair=""))
    return rows


def noisy_editor_params(spec, *, noise: float = 0.05, lr_scale: float = 30.0, seed: int = 0):
    """(editor params, norm state) for `spec` whose nets are not the identity: `init_editor` with
    PRNGKey(seed), then seeded normal noise of std `noise` (PRNGKey(seed + 1)) on every net weight
    and every edit rate times `lr_scale`, so that an edit moves every edited kernel visibly and
    differently from one plain gradient step."""
    import jax

    from salem_jax.mend.editor import init_editor

    params, state = init_editor(spec, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params["nets"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    nets = jax.tree.unflatten(tree, [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return {"nets": nets, "lr": jax.tree.map(lambda x: x * lr_scale, params["lr"])}, state


def noisy_editor(model, layers: Iterable[str], **kw):
    """A `TrainedEditor` (step 0) on `layers`' weights with `noisy_editor_params` (same keywords)."""
    from salem_jax.mend.apply import TrainedEditor
    from salem_jax.mend.editor import EditorSpec

    spec = EditorSpec.from_params(model.layers.weights(list(layers)), model.params)
    params, state = noisy_editor_params(spec, **kw)
    return TrainedEditor(spec=spec, params=params, state=state, model_name=model.name, step=0)


# (id(model), text) -> (model, {module path: inputs [T, in] float64}); the model is kept in the entry
# so that its id cannot be reused by another model while the entry lives
_MODULE_INPUTS: dict = {}
_MODULE_INPUTS_MAX = 256


def _all_module_inputs(model, text: str) -> dict[str, np.ndarray]:
    """{module path: its inputs [T, in] float64} of every module one unpadded forward pass of `text`
    calls (the last call of a module wins), memoised per (model, text): the hand computations of the
    key-statistics tests read several modules of the same texts, one eager pass each before."""
    import flax.linen as nn

    hit = _MODULE_INPUTS.get((id(model), text))
    if hit is not None and hit[0] is model:
        return hit[1]
    ids = np.asarray([model.tokenizer(text)["input_ids"]], np.int32)
    seen = {}

    def icpt(f, args, kwargs, ctx):
        y = f(*args, **kwargs)
        if ctx.method_name == "__call__" and args and getattr(args[0], "ndim", 0) >= 1:  # [1, ...] inputs only
            seen["/".join(ctx.module.path)] = args[0]
        return y

    with nn.intercept_methods(icpt):
        model.apply(model.params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    out = {}
    for k, v in seen.items():
        out[k] = np.asarray(v, np.float64)[0]
        out[k].flags.writeable = False  # shared by every later caller
    if len(_MODULE_INPUTS) >= _MODULE_INPUTS_MAX:
        _MODULE_INPUTS.pop(next(iter(_MODULE_INPUTS)))
    _MODULE_INPUTS[(id(model), text)] = (model, out)
    return out


def module_inputs(model, module_path: str, text: str) -> np.ndarray:
    """The inputs [T, in] (float64) of the module at `module_path` at every token of `text`, read by
    hand with flax's method interception on one unpadded forward pass (the last call of the module
    wins): an independent reading of the keys the key statistics and editors collect. Memoised per
    (model, text) with every module's inputs (`_all_module_inputs`); the array is read-only."""
    seen = _all_module_inputs(model, text)
    if module_path not in seen:
        raise KeyError(f"module {module_path!r} was never called by the model")
    return seen[module_path]


def refused_up_front(cfg, workdir, match: str) -> None:
    """Assert that `pipeline.run_pipeline(cfg, workdir)` raises a ValueError matching `match` before
    any costly step: no edit set was built in `workdir` (the tests of bad config values)."""
    import pytest

    from salem_jax.pipeline import run_pipeline

    with pytest.raises(ValueError, match=match):
        run_pipeline(cfg, workdir)
    assert not (Path(workdir) / "edit_set").exists(), f"{workdir}: an edit set was built before the error"
