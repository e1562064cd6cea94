"""KE: Knowledge Editor (De Cao et al. 2021), as ported by MEND (`algs/efk.py`).

A hyper-network reads a condition text and the edit's gradient and predicts each edited weight's
change in one shot:

    condition  "<original label> >> <desired label> || <input>"  -> token ids [T]
    c = tanh(Linear(BiLSTM(Embedding(ids))))                      [condition_dim]
    for each edited W (PyTorch orientation [m = out, n = in]):
        g = grad_W NLL(model, edit)                               (base model, frozen)
        h = WN-Linear(hidden)(c) -> tanh -> WN-Linear(2(m+n)+1)   (WN = weight normalisation)
        split h -> alpha_col [n], alpha_row [m], beta_col [n], beta_row [m], eta [1]
        A = softmax(alpha_row) (outer) alpha_col,  B = softmax(beta_row) (outer) beta_col   [m, n]
        dW = max_scale * sigmoid(eta) * (A * g + B)                (elementwise)
    W_edited = W + dW

Training (MEND's trainer, KE's objective without the Lagrangian): the hyper-network's parameters
(embedding initialised from the model's word embeddings, BiLSTM, conditioners) minimise

    c_edit * NLL(edited model, edit) + c_loc * KL(base || edited, locality inputs)

with Adam and global-norm clipping; the base model never changes.

Kept from the paper / MEND's port: the condition format and BiLSTM conditioner (the original's
sizes: LSTM hidden 128 per direction, condition 1024, conditioner hidden 128), weight-normed
conditioners, the softmax-outer-product gating of the gradient, one-shot additive update,
max_scale 1 (MEND's port), MEND's loss weights (0.1 NLL + 1.0 KL) and Adam. The edited weights are
whatever the caller passes (the pipeline passes the MLP weights of the same layers as MEND's
fixed choice, the last three blocks, as MEND's port does).
Changed: no Lagrangian KL constraint and margin schedule of the original (MEND's port drops them
too); the original label in the condition is the base model's prediction for classifiers and
the row's true answer for generation; the edit's own input stands in for MEND's rephrased
"edit_outer" input (FEVER and RTE carry no rephrasings here). The learning rate is the caller's
(MEND: 1e-5 for 100k+ steps; a CPU budget of hundreds of steps needs a larger one).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from salem_jax import losses
from salem_jax.baselines.finetune import position_mask
from salem_jax.baselines.meta_data import MetaData, encode_rows
from salem_jax.models.base import Weight, get_path, set_path


@dataclasses.dataclass(frozen=True)
class KEConfig:
    lstm_hidden: int = 128
    condition_dim: int = 1024
    hidden: int = 128
    max_scale: float = 1.0
    cond_length: int = 64  # condition tokens (truncated / padded)
    c_edit: float = 0.1
    c_loc: float = 1.0
    lr: float = 1e-5
    grad_clip: float = 100.0
    steps: int = 100
    loc_per_step: int = 8
    seed: int = 0


# ----------------------------------------------------------------------------- the hyper-network


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _wn_linear(key, n_in: int, n_out: int) -> dict:
    """Weight-normed Linear as torch.nn.utils.weight_norm(Linear): v [in, out], g [out] = |v| per
    output (so the initial weight is v), bias [out]; PyTorch's default uniform init."""
    k1, k2 = jax.random.split(key)
    bound = 1.0 / np.sqrt(n_in)
    v = _uniform(k1, (n_in, n_out), bound)
    return {"v": v, "g": jnp.linalg.norm(v, axis=0), "b": _uniform(k2, (n_out,), bound)}


def _lstm(key, n_in: int, hidden: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    bound = 1.0 / np.sqrt(hidden)
    # one bias = PyTorch's b_ih + b_hh (their sum is all that matters)
    return {"w_ih": _uniform(k1, (n_in, 4 * hidden), bound), "w_hh": _uniform(k2, (hidden, 4 * hidden), bound),
            "b": _uniform(k3, (4 * hidden,), bound) + _uniform(jax.random.fold_in(k3, 1), (4 * hidden,), bound)}


def weight_key(path: str) -> str:
    return path.replace("/", ".")


def oi_shape(weight: Weight, shape) -> tuple[int, int]:
    """(m = out, n = in): the PyTorch orientation KE's conditioner is defined in."""
    fan_in, fan_out = weight.in_out_shape(tuple(shape))
    return fan_out, fan_in


def init_ke(model, weights: Sequence[Weight], config: KEConfig = KEConfig(), seed: int | None = None) -> dict:
    """KE's parameters for editing `weights` of `model` (embedding copied from the model's)."""
    key = jax.random.PRNGKey(config.seed if seed is None else seed)
    emb = jnp.asarray(get_path(model.params, model.layers.embedding + "/embedding"), jnp.float32)
    E, H, C = emb.shape[1], config.lstm_hidden, config.condition_dim
    keys = jax.random.split(key, 3 + len(weights))
    bound = 1.0 / np.sqrt(2 * H)
    params = {
        "embedding": emb,
        "fw": _lstm(keys[0], E, H),
        "bw": _lstm(keys[1], E, H),
        "cond": {"kernel": _uniform(keys[2], (2 * H, C), bound), "bias": _uniform(jax.random.fold_in(keys[2], 1), (C,), bound)},
        "weights": {},
    }
    for k, w in zip(keys[3:], weights):
        m, n = oi_shape(w, get_path(model.params, w.path).shape)
        k1, k2 = jax.random.split(k)
        params["weights"][weight_key(w.path)] = {"l1": _wn_linear(k1, C, config.hidden),
                                                 "l2": _wn_linear(k2, config.hidden, 2 * (m + n) + 1)}
    return params


def _lstm_final(p: dict, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Last hidden state of an LSTM (PyTorch gate order i, f, g, o) over x [T, E], skipping
    masked steps (the state is carried unchanged through them)."""
    H = p["w_hh"].shape[0]

    def cell(carry, inp):
        h, c = carry
        xt, mt = inp
        z = xt @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        i, f, g, o = jax.nn.sigmoid(z[:H]), jax.nn.sigmoid(z[H:2 * H]), jnp.tanh(z[2 * H:3 * H]), jax.nn.sigmoid(z[3 * H:])
        c2 = f * c + i * g
        h2 = o * jnp.tanh(c2)
        return (jnp.where(mt, h2, h), jnp.where(mt, c2, c)), None

    (h, _), _ = jax.lax.scan(cell, (jnp.zeros(H), jnp.zeros(H)), (x, mask.astype(bool)))
    return h


def condition_vector(params: dict, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """c [condition_dim] of one condition text (ids, mask [T], right padded)."""
    x = params["embedding"][ids]
    fw = _lstm_final(params["fw"], x, mask)
    bw = _lstm_final(params["bw"], x[::-1], mask[::-1])
    return jnp.tanh(jnp.concatenate([fw, bw]) @ params["cond"]["kernel"] + params["cond"]["bias"])


def _wn_apply(p: dict, x: jax.Array) -> jax.Array:
    w = p["v"] * (p["g"] / jnp.linalg.norm(p["v"], axis=0))
    return x @ w + p["b"]


def weight_delta(p: dict, c: jax.Array, grad_oi: jax.Array, max_scale: float) -> jax.Array:
    """dW [m, n] (PyTorch orientation) from the condition c and the gradient grad_oi [m, n]."""
    m, n = grad_oi.shape
    h = _wn_apply(p["l2"], jnp.tanh(_wn_apply(p["l1"], c)))
    col_a, row_a, col_b, row_b, eta = jnp.split(h, np.cumsum([n, m, n, m]))
    a = jax.nn.softmax(row_a)[:, None] * col_a[None, :]
    b = jax.nn.softmax(row_b)[:, None] * col_b[None, :]
    return max_scale * jax.nn.sigmoid(eta[0]) * (grad_oi * a + b)


def ke_deltas(params: dict, weights: Sequence[Weight], cond_ids, cond_mask, grads: Mapping[str, jax.Array],
              max_scale: float) -> dict[str, jax.Array]:
    """{path: dW in the stored layout} for one edit; `grads` = {path: grad in the stored layout}."""
    c = condition_vector(params, cond_ids, cond_mask)
    out = {}
    for w in weights:
        g = grads[w.path]
        g_oi = g.T if w.layout == "in_out" else g
        d = weight_delta(params["weights"][weight_key(w.path)], c, g_oi.astype(jnp.float32), max_scale)
        out[w.path] = (d.T if w.layout == "in_out" else d).astype(g.dtype)
    return out


def edit_gradients(apply: Callable, base: Any, weights: Sequence[Weight], batch: dict) -> dict[str, jax.Array]:
    """grad_W NLL(base, batch) for each edited weight (the base model is a constant here)."""
    sub = {w.path: get_path(base, w.path) for w in weights}

    def loss(s):
        p = base
        for k, v in s.items():
            p = set_path(p, k, v)
        return losses.batch_nll(apply(p, batch), batch["labels"], batch["label_mask"])

    return jax.lax.stop_gradient(jax.grad(loss)(sub))


def ke_edit(apply: Callable, ke_params: dict, base: Any, weights: Sequence[Weight], batch: dict, cond_ids, cond_mask,
            max_scale: float) -> Any:
    """The edited parameters: base + KE's one-shot deltas for the edit in `batch` (one row)."""
    grads = edit_gradients(apply, base, weights, batch)
    deltas = ke_deltas(ke_params, weights, cond_ids, cond_mask, grads, max_scale)
    out = base
    for path, d in deltas.items():
        out = set_path(out, path, get_path(base, path) + d)
    return out


# ----------------------------------------------------------------------------- conditions, training


def condition_texts(model, rows: Sequence[Mapping], params=None) -> list[str]:
    """"<original> >> <desired> || <input>" per fail row. The original is the base model's predicted
    label for classifiers, the row's true answer for generation."""
    if model.kind == "classifier":
        labels = list(getattr(model.config, "id2label", {}).values()) or None
        batch = encode_rows(model, rows)
        pred = np.asarray(jnp.argmax(jax.jit(model.apply)(model.params if params is None else params, batch)[:, 0], -1))
        names = [str(labels[int(k)]) if labels and int(k) < len(labels) else str(int(k)) for k in pred]
        desired = [str(labels[int(r["label"])]) if labels else str(r["label"]) for r in rows]
        return [f"{o} >> {d} || {r['prompt']}" + (f" {r['text_pair']}" if r.get("text_pair") else "")
                for o, d, r in zip(names, desired, rows)]
    return [f"{r.get('target_true', '')} >> {r['target']} || {r['prompt']}" for r in rows]


def encode_conditions(model, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = model.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=length,
                          padding="max_length")
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    if (mask.sum(-1) == 0).any():
        raise ValueError("a KE condition text tokenizes to nothing")
    return ids, mask


def ke_loss(ke_params, apply, base, weights, edit_batch, loc_batch, base_loc_logits, cond_ids, cond_mask,
            config: KEConfig):
    edited = ke_edit(apply, ke_params, base, weights, edit_batch, cond_ids, cond_mask, config.max_scale)
    l_edit = losses.batch_nll(apply(edited, edit_batch), edit_batch["labels"], edit_batch["label_mask"])
    l_loc = losses.kl_divergence(base_loc_logits, apply(edited, loc_batch), position_mask(loc_batch))
    total = config.c_edit * l_edit + config.c_loc * l_loc
    return total, dict(edit=l_edit, loc=l_loc, total=total)


def make_optimizer(config: KEConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(config.lr))


@functools.lru_cache(maxsize=8)
def _make_step(apply: Callable, weights: tuple[Weight, ...], config: KEConfig):
    tx = make_optimizer(config)

    def step(ke_params, opt_state, base, edit_batch, loc_batch, cond_ids, cond_mask):
        base_loc = jax.lax.stop_gradient(apply(base, loc_batch))
        (_, parts), grads = jax.value_and_grad(ke_loss, has_aux=True)(
            ke_params, apply, base, weights, edit_batch, loc_batch, base_loc, cond_ids, cond_mask, config)
        updates, opt_state = tx.update(grads, opt_state, ke_params)
        return optax.apply_updates(ke_params, updates), opt_state, parts

    return jax.jit(step)


def ke_train_step(model, ke_params, opt_state, weights, edit_batch, loc_batch, cond_ids, cond_mask, config: KEConfig):
    """One training step on one edit (edit_batch: 1 row; cond_ids / cond_mask [T])."""
    step = _make_step(model.apply, tuple(weights), config)
    return step(ke_params, opt_state, model.params, edit_batch, loc_batch, cond_ids, cond_mask)


@dataclasses.dataclass
class KEResult:
    params: dict
    weights: tuple[Weight, ...]
    config: KEConfig
    history: list[dict]
    seconds: float


def train_ke(model, data: MetaData, weights: Sequence[Weight], config: KEConfig = KEConfig(),
             progress: bool = True) -> KEResult:
    """Train KE's hyper-network on `data` (the editor-train split), one edit per step."""
    t0 = time.perf_counter()
    if data.edits_per_step != 1:
        raise ValueError("KE conditions on one edit at a time: MetaData.edits_per_step must be 1")
    weights = tuple(weights)
    ke_params = init_ke(model, weights, config)
    tx = make_optimizer(config)
    opt_state = tx.init(ke_params)
    cond_ids, cond_mask = encode_conditions(model, condition_texts(model, data.edit_rows), config.cond_length)
    history = []
    bar = tqdm(range(config.steps), desc="KE", disable=not progress)
    for s in bar:
        eb, lb = data.batch(s)
        i = int(data.edit_indices(s)[0])
        ke_params, opt_state, parts = ke_train_step(model, ke_params, opt_state, weights, eb, lb, cond_ids[i],
                                                    cond_mask[i], config)
        if s % 10 == 0 or s == config.steps - 1:
            rec = {k: float(v) for k, v in parts.items()}
            history.append(dict(step=s, **rec))
            bar.set_postfix(loss=f"{rec['total']:.4f}")
    return KEResult(ke_params, weights, config, history, time.perf_counter() - t0)


def ke_edit_fn(model, result: KEResult, base: Any = None) -> Callable[[list[dict]], Any]:
    """Edit function: one fail row -> base + KE's deltas (`base` defaults to the model's parameters)."""
    cfg = result.config
    base = model.params if base is None else base
    edit = jax.jit(lambda kp, base, batch, ids, mask: ke_edit(model.apply, kp, base, result.weights, batch, ids, mask,
                                                              cfg.max_scale))

    def fn(rows):
        if len(rows) != 1:
            raise ValueError(f"KE edits one row at a time, got {len(rows)}")
        ids, mask = encode_conditions(model, condition_texts(model, rows), cfg.cond_length)
        return edit(result.params, base, encode_rows(model, rows), ids[0], mask[0])

    return fn
