"""Which layer do the errors come from? SaLEM's saliency profiles (paper section 3.2) and variants.

The paper scores each layer by the gradient of the loss on the edit data:

    eq. 2  parameter saliency  s_i(x)  = |dL(x)/d theta_i|                       (per example)
    eq. 3  column saliency     s_p(x)  = mean of s_i(x) over the parameters of column p
    eq. 4  layer saliency      s_l(x)  = mean of s_p(x) over the columns p of layer l
    eq. 5  edit layers         EL      = the top-K layers by s_l

and the profile of a data set is the average of the per-example saliencies: mean over examples
of |g| (never |mean of g|, which is a different quantity; both are available, named below).

What a "column" is. One column per OUTPUT unit of a kernel, whatever its storage layout:

    layout "in_out" (flax Dense, kernel [in, out], y = x @ W):      column j = W[:, j]  (mean over axis 0)
    layout "out_in" (GPT-2 Conv1D, kernel [out, in], y = x @ W.T):  column j = W[j, :]  (mean over axis 1)

so a kernel of fan-out `n` has `n` columns of `fan_in` parameters each, and the same neuron gets
the same column in either layout. Layer saliency (eq. 4) is the mean over ALL columns of all the
weights the layer table lists for the layer (`part`: "mlp" by default, "attention" or "all"), each
column counted once: a layer with a [576, 1536] and a [1536, 576] kernel has 1536 + 576 columns.

Scorers (chosen by name; the "salem" scorer is the paper's reference). For a group of rows D
(the edit set's "fail", "adapt" and "pass" groups, or all rows = "overall"), with g(x) the
gradient of the mean target-token NLL of example x and W the weight:

    salem          mean_{x in D} colmean_layer |g(x)|                      eq. 2-4 as written
    grad_x_weight  mean_{x in D} colmean_layer |g(x) * W|                  first-order attribution
    mean_sq        mean_{x in D} colmean_layer g(x)^2
    abs_mean_grad  colmean_layer |mean_{x in D} g(x)|                      gradient of the mean loss
    contrast       salem(D) - salem(pass)                                  fail-minus-pass (D != pass)
    lga            Layer Gradient Analysis, see `lga_scores` for the exact definition

where colmean_layer(.) is eq. 3 then eq. 4 applied to a parameter-shaped array.

Memory. `saliency_stats` never holds per-example gradients for more than one micro-batch. On one
device its jitted step (`_factor_step`) takes `micro_batch` rows, captures every tracked
kernel's gradient factors (u, delta) in one forward and backward pass, and computes each row's
column statistics from them tile by tile (see `_factor_column_stats`): no per-example gradient
is ever whole in memory. With sharded parameters (and with `by_gradients=True`) the step
(`_saliency_step`) computes the per-example gradients (`jax.vmap` of `jax.grad` over the whole
parameter pytree), reduces each at once to per-column statistics and adds them to a fixed-size
state. Peak memory of that step is about

    params  +  micro_batch x (one gradient of the tracked weights + activations of one example)
            +  3 x (columns of the tracked weights) x groups          (column statistics)
            +  groups x (tracked weights)                             (only with track_mean=True)

whatever the number of examples (XLA drops the gradients of untracked leaves such as the
embedding, which nothing reads); the factor step needs the activations and factors of the
micro-batch instead of its gradients. Each step compiles once per (micro_batch, sequence length);
`SaliencyStats.traces` counts the compilations. With parameters sharded over N devices every
term is split N ways (per-example gradients and gradient sums like their weights, see
`_grad_shardings`), plus the gathered weights (`salem_jax.sharding`); `lower_step` gives XLA's
planned bytes per device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from salem_jax.compile_cache import compilations
from salem_jax.data.tokenize import pad_rows, slice_rows
from salem_jax.locate.profile import LayerProfile, jsonable, top_k_layers
from salem_jax.losses import example_nll, token_logprobs
from salem_jax.mend.capture import capture
from salem_jax.models.base import LoadedModel, Part, Weight, get_path
from salem_jax.parallel import fetch
from salem_jax.scored_logits import scored_labels, scored_logits, with_score_positions
from salem_jax.sharding import mesh_of, put, rows_sharding, shardings, spec_like

GROUPS = ("fail", "adapt", "pass")
SCORERS = ("salem", "grad_x_weight", "mean_sq", "abs_mean_grad", "contrast", "lga")
# Per-example statistics the streaming pass keeps (eq. 3-4 of each elementwise transform of g).
_ELEMENTWISE = ("salem", "grad_x_weight", "mean_sq")

Examples = tuple[dict, Sequence[str] | None]

# The jitted steps are module-level functions with the model's `apply` as a static argument, so
# repeated calls on one model reuse their compilations (`compile_cache.compilations` counts them).


# ----------------------------------------------------------------------------- result


# ----------------------------------------------------------------------------- eq. 2-5 on explicit arrays


def example_losses(model: LoadedModel, params: Any, batch: dict) -> jax.Array:
    """Mean target-token NLL of each example: [B] (the loss L(X, Y) of eq. 2)."""
    logits = model.apply(params, batch)
    return example_nll(logits, batch["labels"], batch["label_mask"])


def per_example_grads(model: LoadedModel, params: Any, batch: dict) -> Any:
    """The gradient of each example's loss over the WHOLE parameter pytree: leaves [B, *shape].

    Holds B full gradients: for small batches and tests. `saliency_stats` is the streaming form.
    """

    return _per_example_grads(model.apply, params, {k: jnp.asarray(v) for k, v in batch.items()})


@functools.partial(jax.jit, static_argnums=(0,))
def _per_example_grads(apply, params, batch):
    return _grad_one(apply, _nll)(params, batch)


def parameter_saliency(model: LoadedModel, params: Any, batch: dict) -> Any:
    """Eq. 2: |d L(x) / d theta| for every parameter and example: a pytree with leaves [B, *shape]."""
    _check_batch(model, batch, None)
    return jax.tree.map(jnp.abs, per_example_grads(model, params, batch))


def input_axis(weight: Weight) -> int:
    """The axis of a (batched) kernel `[..., a, b]` that runs over a column's parameters.

    "in_out" kernels `[in, out]`: column j is W[:, j], so the mean runs over axis -2.
    "out_in" kernels `[out, in]`: column j is W[j, :], so the mean runs over axis -1.
    """
    return -2 if weight.layout == "in_out" else -1


def column_means(weight: Weight, values: jax.Array) -> jax.Array:
    """Eq. 3 for one weight: mean of `values` (kernel-shaped, optional leading dims) over each
    output-unit column: [..., fan_out]."""
    if values.ndim < 2:
        raise ValueError(f"{weight.path}: expected a 2-D kernel, got shape {values.shape}")
    return jnp.mean(values, axis=input_axis(weight))


def column_saliency(model: LoadedModel, saliency: Any, part: Part = "mlp", layers: Sequence[str] | None = None) -> dict:
    """Eq. 3: {weight path: column saliency [..., fan_out]} for the weights of `part` of `layers`.

    `saliency` is a parameter-shaped pytree (e.g. `parameter_saliency`, leaves [B, *shape]).
    """
    return {w.path: column_means(w, get_path(saliency, w.path)) for w in model.layers.weights(layers, part)}


def layer_saliency(
    model: LoadedModel, columns: dict, part: Part = "mlp", layers: Sequence[str] | None = None
) -> jax.Array:
    """Eq. 4: mean over all columns of a layer's weights: [..., L] in `layers` order (default all)."""
    blocks = model.layers.blocks if layers is None else model.layers.select(layers)
    out = []
    for b in blocks:
        ws = b.weights(part)
        if not ws:
            raise ValueError(f"layer {b.name} lists no {part!r} weights")
        out.append(jnp.concatenate([columns[w.path] for w in ws], axis=-1).mean(-1))
    return jnp.stack(out, axis=-1)


# ----------------------------------------------------------------------------- input checks


def _check_batch(model: LoadedModel, batch: dict, groups: Sequence[str] | None, where: str = "batch") -> int:
    """Validate a batch dict; returns the number of labelled rows (rows past it are padding)."""
    for k in ("input_ids", "labels", "label_mask"):
        if k not in batch:
            raise ValueError(f"{where}: missing field {k!r} (see the batch convention in models/base.py)")
    n = int(np.shape(batch["input_ids"])[0])
    if n == 0:
        raise ValueError(f"{where}: empty batch (no examples)")
    for k, v in batch.items():
        if np.shape(v)[0] != n:
            raise ValueError(f"{where}: field {k!r} has {np.shape(v)[0]} rows, input_ids has {n}")
    for k in ("input_ids", "decoder_input_ids"):
        if k in batch and np.shape(batch[k])[1] > model.max_length:
            raise ValueError(
                f"{where}: field {k!r} is {np.shape(batch[k])[1]} tokens long, longer than the context of "
                f"{model.name} ({model.max_length})"
            )
    n_lab = n if groups is None else len(groups)
    if n_lab == 0:
        raise ValueError(f"{where}: empty batch (no group labels)")
    if n_lab > n:
        raise ValueError(f"{where}: {n_lab} group labels for {n} rows")
    counts = np.asarray(batch["label_mask"]).sum(-1)
    empty = np.flatnonzero(counts[:n_lab] == 0)
    if len(empty):
        raise ValueError(f"{where}: row {int(empty[0])} has no target tokens (field 'label_mask' is all zero)")
    if n_lab < n and counts[n_lab:].any():
        raise ValueError(f"{where}: rows past the {n_lab} labelled ones must be padding (all-zero 'label_mask')")
    return n_lab


def _as_examples(data: Examples | Iterable[Examples]) -> list[Examples]:
    """One (batch, groups) pair or an iterable of them -> a list of pairs."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], dict):
        return [data]
    if isinstance(data, dict):
        return [(data, None)]
    out = list(data)
    if not out:
        raise ValueError("empty batch: no examples were given")
    return [(d, None) if isinstance(d, dict) else d for d in out]


def _checked_examples(model: LoadedModel, data: Examples | Iterable[Examples]) -> tuple[list, tuple[str, ...]]:
    """([(batch, one group name per labelled row, labelled rows)], the group names in order),
    every batch checked (`_check_batch`) before anything runs."""
    checked = []
    for i, (b, grp) in enumerate(_as_examples(data)):
        n = _check_batch(model, b, grp, where=f"batch {i}")
        checked.append((b, list(grp) if grp is not None else ["fail"] * n, n))
    return checked, _group_names(g for _, gs, _ in checked for g in gs)


def _group_names(all_groups: Iterable[str]) -> tuple[str, ...]:
    seen = set(all_groups)
    return tuple(g for g in GROUPS if g in seen) + tuple(sorted(seen - set(GROUPS)))


def _micro_batches(batch: dict, n_rows: int, m: int):
    """Yield (start, rows, micro-batch padded to m rows)."""

    for s in range(0, n_rows, m):
        e = min(s + m, n_rows)
        yield s, e - s, pad_rows(slice_rows({k: np.asarray(v) for k, v in batch.items()}, s, e), m)


# ----------------------------------------------------------------------------- streaming statistics


@dataclasses.dataclass
class SaliencyStats:
    """What one streaming pass over the data keeps (numpy on the host; float32 gradient sums).

    per_example[name]  [N, L]   per-example layer score for name in ("salem", "grad_x_weight",
                                "mean_sq"), rows in input order (padding dropped)
    row_groups         [N]      group name of each row
    column_sums[name]  {weight path: [G, fan_out]}  sum over a group's rows of the per-example
                                column statistic (eq. 3), G in `groups` order
    grad_sums          {weight path: [G, *kernel shape]}  float32 sum of g over each group's
                                rows (None unless track_mean)
    """

    model: str
    layers: tuple[str, ...]
    part: str
    weights: tuple[Weight, ...]
    layer_paths: dict[str, tuple[str, ...]]  # layer name -> its tracked weight paths
    groups: tuple[str, ...]
    row_groups: np.ndarray
    per_example: dict[str, np.ndarray]
    column_sums: dict[str, dict[str, np.ndarray]]
    grad_sums: dict[str, np.ndarray] | None
    traces: int
    wall_time: float

    def counts(self) -> dict[str, int]:
        return {g: int((self.row_groups == g).sum()) for g in self.groups}

    def column_profile(self, name: str = "salem", group: str = "overall") -> dict[str, np.ndarray]:
        """Mean per-column statistic over a group's rows: {weight path: [fan_out]} (eq. 3 averaged)."""
        if name == "abs_mean_grad":
            if self.grad_sums is None:
                raise ValueError("abs_mean_grad needs saliency_stats(..., track_mean=True)")
            sums = self.grad_sums
            n = self._rows(group)
            return {w.path: np.asarray(column_means(w, jnp.abs(jnp.asarray(self._pick(sums[w.path], group) / n)))) for w in self.weights}
        if name not in self.column_sums:
            raise ValueError(f"no column statistic {name!r}; have {sorted(self.column_sums)} and 'abs_mean_grad'")
        n = self._rows(group)
        return {p: self._pick(v, group) / n for p, v in self.column_sums[name].items()}

    def _rows(self, group: str) -> int:
        n = len(self.row_groups) if group == "overall" else int((self.row_groups == group).sum())
        if n == 0:
            raise ValueError(f"no rows in group {group!r}; groups present: {self.counts()}")
        return n

    def _pick(self, v: np.ndarray, group: str) -> np.ndarray:
        return v.sum(0) if group == "overall" else v[self.groups.index(group)]

    def layer_scores(self, scorer: str = "salem", group: str = "overall") -> np.ndarray:
        """Per-layer score [L] of `scorer` ("salem", "grad_x_weight", "mean_sq", "abs_mean_grad",
        "contrast") on `group` ("fail", "adapt", "pass", "overall"; for contrast "overall" means
        all non-pass rows)."""
        if scorer in _ELEMENTWISE:
            pe = self.per_example[scorer]
            rows = np.ones(len(pe), bool) if group == "overall" else self.row_groups == group
            self._rows(group)
            return pe[rows].mean(0)
        if scorer == "abs_mean_grad":
            return _layer_mean_np(self.layer_paths, self.column_profile("abs_mean_grad", group))
        if scorer == "contrast":
            if group == "pass":
                raise ValueError("contrast is defined for the edit groups, not 'pass'")
            pe = self.per_example["salem"]
            passes = self.row_groups == "pass"
            if not passes.any():
                raise ValueError(f"contrast needs rows of group 'pass'; groups present: {self.counts()}")
            edits = ~passes if group == "overall" else self.row_groups == group
            if not edits.any():
                raise ValueError(f"no rows in group {group!r}; groups present: {self.counts()}")
            return pe[edits].mean(0) - pe[passes].mean(0)
        if scorer == "lga":
            raise ValueError("lga is not a saliency statistic: call lga_scores(...)")
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")

    def score_groups(self, scorer: str) -> dict[str, list[float]]:
        """{group: per-layer scores} for every group where `scorer` is defined."""
        out = {}
        groups = [g for g in self.groups if not (scorer == "contrast" and g == "pass")] + ["overall"]
        for g in groups:
            try:
                out[g] = [float(x) for x in self.layer_scores(scorer, g)]
            except ValueError:
                continue
        return out


def _layer_mean_np(layer_paths: dict[str, tuple[str, ...]], cols: dict[str, np.ndarray]) -> np.ndarray:
    """Eq. 4 on host arrays: [L] from {path: [fan_out]}."""
    return np.asarray([np.concatenate([np.asarray(cols[p]) for p in ps]).mean() for ps in layer_paths.values()])


def _tracked(model: LoadedModel, params: Any, layers: Sequence[str] | None, part: Part):
    names = tuple(model.layers.names()) if layers is None else tuple(b.name for b in model.layers.select(layers))
    if not names:
        raise ValueError("no layers to score")
    weights = model.layers.weights(names, part)
    if not weights:
        raise ValueError(f"the layer table lists no {part!r} weights for layers {names}")
    for w in weights:
        w.in_out_shape(np.shape(get_path(params, w.path)))  # 2-D check with a clear error
    layer_paths = {b.name: tuple(w.path for w in b.weights(part)) for b in model.layers.select(names)}
    for n, ps in layer_paths.items():
        if not ps:
            raise ValueError(f"layer {n} lists no {part!r} weights")
    return names, weights, layer_paths


def _layer_stack(layer_paths: tuple[tuple[str, ...], ...], cols: dict[str, jax.Array]) -> jax.Array:
    """[m, L]: eq. 4 from per-example column statistics {path: [m, fan_out]}."""
    return jnp.stack([jnp.concatenate([cols[p] for p in ps], -1).mean(-1) for ps in layer_paths], -1)


def _nll(apply, params, batch) -> jax.Array:
    return example_nll(apply(params, batch), batch["labels"], batch["label_mask"])


def _grad_one(apply, loss):
    """d loss(one example) / d params over the whole pytree, vmapped over a micro-batch."""

    def one(p, ex):
        return loss(apply, p, {k: v[None] for k, v in ex.items()})[0]

    return jax.vmap(jax.grad(one), in_axes=(None, 0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(6,))
def _saliency_step(apply, weights, layer_paths, track_mean, state_shardings, grad_shardings, state, params, batch, onehot):
    """state + per-column statistics of one micro-batch; also returns per-example layer scores.

    state_shardings: None, or one NamedSharding per leaf of `state` (sharded parameters): the
    new state is held to them, so the donated state keeps its placement and the step compiles
    once. grad_shardings: None, or one NamedSharding per tracked weight for its per-example
    gradients [m, a, b] (see `_grad_shardings`)."""
    g = _grad_one(apply, _nll)(params, batch)  # the whole pytree, per example
    cols = {name: {} for name in _ELEMENTWISE}
    new = {"cols": {}, "grad": {}}
    for i, w in enumerate(weights):
        gw = get_path(g, w.path).astype(jnp.float32)  # [m, a, b]
        if grad_shardings is not None:
            gw = jax.lax.with_sharding_constraint(gw, grad_shardings[i])
        W = get_path(params, w.path).astype(jnp.float32)
        ax = input_axis(w)
        cols["salem"][w.path] = jnp.abs(gw).mean(ax)
        cols["grad_x_weight"][w.path] = jnp.abs(gw * W[None]).mean(ax)
        cols["mean_sq"][w.path] = jnp.square(gw).mean(ax)
        if track_mean:
            new["grad"][w.path] = state["grad"][w.path] + jnp.tensordot(onehot, gw, axes=([0], [0]))
    for name in _ELEMENTWISE:
        new["cols"][name] = {q: state["cols"][name][q] + onehot.T @ cols[name][q] for q in cols[name]}
    per_ex = {name: _layer_stack(layer_paths, cols[name]) for name in _ELEMENTWISE}
    if state_shardings is not None:
        leaves, tree = jax.tree.flatten(new)
        new = jax.tree.unflatten(tree, [jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, state_shardings)])
    return new, per_ex


# The factor path (one device; `saliency_stats` on unsharded parameters). A row's gradient of an
# "in_out" kernel is G = u^T delta ([fan_in, fan_out], u [T, fan_in], delta [T, fan_out]: the
# layer's input and the gradient w.r.t. its output, `salem_jax.mend.capture`), and every
# statistic the pass keeps is a column statistic of G. So instead of materialising the
# per-example gradients of all tracked weights (micro_batch x every tracked weight: 2.5 GB for 8
# rows of SmolLM2's MLPs, written once and read per statistic), the step computes G one
# [chunk, fan_out] tile of one row at a time inside a `lax.scan`, reduces the tile at once and
# keeps only [fan_out] sums: the same flops, the tile stays in cache. The backward pass itself
# computes no weight gradients (the factors are gradients w.r.t. zero perturbations), and the
# LM head runs at the scored positions only (`scored_logits`). Same numbers as the
# per-example-gradient step up to float32 summation order (tests/test_saliency.py).
_TILE = 192  # input rows of G per tile (a divisor of fan_in is used; see `_tile_of`)


def _tile_of(fan_in: int, target: int = _TILE) -> int:
    """The largest divisor of fan_in that is <= target (static)."""
    return max(c for c in range(1, min(fan_in, target) + 1) if fan_in % c == 0)


def _factor_column_stats(u: jax.Array, delta: jax.Array, w_io: jax.Array) -> jax.Array:
    """Column statistics of each row's kernel gradient G_r = u_r^T delta_r, never holding G_r whole.

    u [m, T, fan_in], delta [m, T, fan_out], w_io [fan_in, fan_out] (the kernel in "in_out"
    layout). Returns [m, 3, fan_out]: per output column j, the means over i of |G_r[i, j]|,
    |G_r[i, j] * W[i, j]| and G_r[i, j]^2 (eq. 3 of the "salem", "grad_x_weight" and "mean_sq"
    transforms)."""
    m, t, fan_in = u.shape
    c = _tile_of(fan_in)
    n = fan_in // c
    tiles = u.reshape(m, t, n, c).transpose(0, 2, 1, 3).reshape(m * n, t, c)  # tile k = (row k // n, cols k % n)
    aw = jnp.abs(w_io)

    def body(acc, xs):
        ut, k = xs
        r = k // n
        g = ut.T @ jax.lax.dynamic_index_in_dim(delta, r, 0, keepdims=False)  # [c, fan_out]
        a = jnp.abs(g)
        wt = jax.lax.dynamic_slice_in_dim(aw, (k % n) * c, c, 0)
        upd = jnp.stack([a.sum(0), (a * wt).sum(0), (g * g).sum(0)])
        row = jax.lax.dynamic_index_in_dim(acc, r, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, row + upd, r, 0), None

    acc0 = jnp.zeros((m, 3, delta.shape[-1]), jnp.float32)
    acc, _ = jax.lax.scan(body, acc0, (tiles, jnp.arange(m * n)))
    return acc / fan_in


def _add_group_grad_sums(acc: jax.Array, onehot: jax.Array, u: jax.Array, delta: jax.Array, layout: str) -> jax.Array:
    """acc + per group g the summed kernel gradient sum_r onehot[r, g] u_r^T delta_r.

    acc [G, fan_in, fan_out] ("in_out") or [G, fan_out, fan_in] ("out_in"); onehot [m, G] (a
    row's group, all zero for padding), u [m, T, fan_in], delta [m, T, fan_out]. One dense einsum
    over (r, g) would multiply every row into every group (G times a gradient's flops) and build
    a [G, ...] temporary as big as G copies of the kernel. Here each group's sum is one masked
    contraction over the rows' tokens, added in place to that group's slice, under `lax.cond`
    only when the micro-batch has a row of that group: a micro-batch of one group (the usual case: the
    pipeline samples its rows group by group, `sample_by_group`) does one gradient's flops and touches one G-th of the sums.
    (On SmolLM2, 8 rows x 8 tokens of one group, the whole step timed within noise of the dense
    einsum in an interleaved ad-hoc A/B, 0.172 against 0.174 s per row: XLA fuses the dense form
    well on this CPU; the saving is memory and flops, not yet time there.)"""
    spec = "r,rti,rto->io" if layout == "in_out" else "r,rti,rto->oi"
    for g in range(onehot.shape[1]):
        m = onehot[:, g]
        acc = jax.lax.cond(jnp.any(m != 0), lambda a, m=m, g=g: a.at[g].add(jnp.einsum(spec, m, u, delta)), lambda a: a, acc)
    return acc


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _factor_step(apply, weights, layer_paths, track_mean, state, params, batch, onehot):
    """`_saliency_step`'s result (state + per-example layer scores) from the gradient factors:
    see the comment above `_TILE`. One device only (the sharded path keeps `_saliency_step`)."""

    def loss(logits, b):
        labels, mask = scored_labels(b)
        return example_nll(logits, labels, mask).sum()  # summed: each row's factors are its own

    _, f = capture(lambda p, b: scored_logits(apply, p, b)[0], params, batch, weights, loss)
    cols = {name: {} for name in _ELEMENTWISE}
    new = {"cols": {}, "grad": {}}
    for w in weights:
        u = f[w.path].u.astype(jnp.float32)  # [m, T, fan_in]
        d = f[w.path].delta.astype(jnp.float32)  # [m, T, fan_out]
        W = get_path(params, w.path).astype(jnp.float32)
        st = _factor_column_stats(u, d, W if w.layout == "in_out" else W.T)
        for i, name in enumerate(_ELEMENTWISE):
            cols[name][w.path] = st[:, i]
        if track_mean:
            new["grad"][w.path] = _add_group_grad_sums(state["grad"][w.path], onehot, u, d, w.layout)
    for name in _ELEMENTWISE:
        new["cols"][name] = {q: state["cols"][name][q] + onehot.T @ cols[name][q] for q in cols[name]}
    per_ex = {name: _layer_stack(layer_paths, cols[name]) for name in _ELEMENTWISE}
    return new, per_ex


def _grad_shardings(params: Any, weights: Sequence[Weight], mesh) -> tuple | None:
    """Placement of each tracked weight's per-example gradients [m, a, b] on `mesh`: like the
    weight itself (every row's gradient split over all devices), None without a mesh.

    Why not rows over "data", as the micro-batch is: the sums over rows into the gradient-sum
    state would then be partial on every "data" row of devices, and XLA combines those
    all-reduces of every layer into one, keeping all layers' per-example gradients alive until
    it runs (per device: micro_batch x all tracked weights / "model"). Split like the weight,
    the row sums, the state update and the column means over a weight's "data"-split axis need
    no communication but small all-reduces of [m, fan_out] statistics: per device one micro-
    batch's gradients / N."""
    if mesh is None:
        return None
    return tuple(NamedSharding(mesh, spec_like(get_path(params, w.path), mesh, lead=1)) for w in weights)


def _sharded_state(state: dict, params: Any, mesh) -> tuple[dict, tuple]:
    """The streaming state placed on `mesh`: column statistics replicated (small), gradient sums
    [G, *kernel] sharded like their kernels (as big as the weights). Returns (state, shardings)."""
    spec_tree = {
        "cols": {n: {q: P(None, None) for q in d} for n, d in state["cols"].items()},
        "grad": {q: spec_like(get_path(params, q), mesh, lead=1) for q in state["grad"]},
    }
    shard_tree = shardings(spec_tree, mesh)
    placed = jax.tree.map(put, state, shard_tree)
    return placed, tuple(jax.tree.leaves(shard_tree))


def saliency_stats(
    model: LoadedModel,
    params: Any,
    data: Examples | Iterable[Examples],
    *,
    part: Part = "mlp",
    layers: Sequence[str] | None = None,
    micro_batch: int = 8,
    track_mean: bool = True,
    progress: bool = False,
    by_gradients: bool = False,
) -> SaliencyStats:
    """Stream per-example saliency statistics over `data` (see the module docstring for memory).

    On one device the step works from each row's gradient factors (`_factor_step`: the kernel
    gradients are never materialised); `by_gradients=True` forces the per-example-gradient step
    (`_saliency_step`, vmap of grad), which sharded parameters always use. Both give the same
    numbers up to float32 summation order.

    data: a batch dict (every row a "fail" row), a `(batch, groups)` pair with one group name per
    row (rows past len(groups) must be padding with an all-zero label_mask), or an iterable of
    such pairs (e.g. from `salem_jax.data.edit_set.edit_set_batches`). Batches of different
    sequence lengths each compile once.

    params may be sharded over a device mesh (`salem_jax.sharding.shard_params`): the step then
    runs on that mesh, every micro-batch split over its "data" axis (when micro_batch divides),
    the per-example gradients and gradient sums sharded like the weights; the numbers are the
    one-device numbers.
    """
    t0 = time.perf_counter()
    names, weights, layer_paths = _tracked(model, params, layers, part)
    checked, groups = _checked_examples(model, data)
    G = len(groups)
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")

    step = _saliency_step if by_gradients or mesh_of(params) is not None else _factor_step
    traces0 = compilations(step)
    static, state, put_rows = _step_setup(model, params, weights, layer_paths, G, micro_batch, track_mean)
    if step is _factor_step:
        static = static[:4]
        # one K for every micro-batch (the most scored positions of any row): one compilation per length
        k_pos = 1 << (max(1, max(int((np.asarray(b["label_mask"]) != 0).sum(-1).max(initial=0)) for b, _, _ in checked)) - 1).bit_length()

    total = sum(-(-n // micro_batch) for _, _, n in checked)
    bar = _progress(total, "saliency", progress)
    per_ex = {name: [] for name in _ELEMENTWISE}
    row_groups: list[str] = []
    for b, grp, n in checked:
        gidx = np.asarray([groups.index(g) for g in grp])
        for s, rows, mb in _micro_batches(b, n, micro_batch):
            onehot = np.zeros((micro_batch, G), np.float32)
            onehot[np.arange(rows), gidx[s : s + rows]] = 1.0
            if step is _factor_step:
                mb = with_score_positions(mb, k_pos)
            state, pe = step(*static, state, params, {k: put_rows(v) for k, v in mb.items()}, put_rows(onehot))
            pe = fetch(pe)
            for name in _ELEMENTWISE:
                per_ex[name].append(np.asarray(pe[name])[:rows])
            bar.update(1)
        row_groups.extend(grp)
    bar.close()
    state = fetch(state)
    stats = SaliencyStats(
        model=model.name,
        layers=names,
        part=part,
        weights=weights,
        layer_paths=layer_paths,
        groups=groups,
        row_groups=np.asarray(row_groups),
        per_example={k: np.concatenate(v).astype(np.float64) for k, v in per_ex.items()},
        column_sums={k: {p: np.asarray(v, np.float64) for p, v in d.items()} for k, d in state["cols"].items()},
        grad_sums={p: np.asarray(v) for p, v in state["grad"].items()} if track_mean else None,  # float32: as big as the weights
        traces=compilations(step) - traces0,
        wall_time=time.perf_counter() - t0,
    )
    return stats


def _step_setup(model: LoadedModel, params: Any, weights, layer_paths: dict, G: int, micro_batch: int, track_mean: bool):
    """(static arguments of `_saliency_step`, its zero state, `put` for the micro-batch arrays):
    on a mesh when `params` are sharded over one, state and rows placed as the step keeps them."""
    fan_out = {w.path: w.in_out_shape(np.shape(get_path(params, w.path)))[1] for w in weights}
    state = {
        "cols": {name: {w.path: jnp.zeros((G, fan_out[w.path]), jnp.float32) for w in weights} for name in _ELEMENTWISE},
        "grad": {w.path: jnp.zeros((G,) + tuple(np.shape(get_path(params, w.path))), jnp.float32) for w in weights}
        if track_mean
        else {},
    }
    mesh = mesh_of(params)
    state_shardings = None
    put_rows = jnp.asarray
    if mesh is not None:
        state, state_shardings = _sharded_state(state, params, mesh)
        rows = rows_sharding(mesh, micro_batch)
        put_rows = lambda x: put(x, rows)  # noqa: E731
    static = (model.apply, weights, tuple(layer_paths.values()), track_mean, state_shardings, _grad_shardings(params, weights, mesh))
    return static, state, put_rows


def lower_step(
    model: LoadedModel, params: Any, batch: dict, *, groups: int = 3, part: Part = "mlp", track_mean: bool = True
) -> jax.stages.Lowered:
    """The streaming step of `saliency_stats` lowered for one micro-batch `batch` (its rows =
    micro_batch) and `groups` groups, placed as `saliency_stats` places it (sharded when
    `params` are): `.compile().memory_analysis()` is the memory XLA plans per device."""
    _, weights, layer_paths = _tracked(model, params, None, part)
    m = int(np.shape(batch["input_ids"])[0])
    static, state, put_rows = _step_setup(model, params, weights, layer_paths, groups, m, track_mean)
    onehot = np.zeros((m, groups), np.float32)
    onehot[:, 0] = 1.0
    return _saliency_step.lower(*static, state, params, {k: put_rows(np.asarray(v)) for k, v in batch.items()}, put_rows(onehot))


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- Layer Gradient Analysis


def margin_losses(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example margin of the existing answer over the desired one: [B].

    At each counted target position s where the model's own teacher-forced argmax a_s (its
    existing answer, held constant) differs from the desired token y_s, take
    log p(a_s) - log p(y_s); average over those positions (0 for an example already right).
    Lowering it moves probability from the existing answer to the desired target.
    """
    existing = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    d = mask.astype(jnp.float32) * (existing != labels).astype(jnp.float32)
    gap = token_logprobs(logits, existing) - token_logprobs(logits, labels)
    return (gap * d).sum(-1) / jnp.maximum(d.sum(-1), 1.0)


@dataclasses.dataclass
class LGAStats:
    """Per-example first-order attributions of Layer Gradient Analysis (see `lga_scores`).

    attribution [N, L]: <sign(G_l), grad_l loss(x)> for each row x (loss = margin for edit rows,
    target NLL for pass rows); row_groups [N]; edit_grad_l1 [L] = ||G_l||_1.
    """

    model: str
    layers: tuple[str, ...]
    part: str
    groups: tuple[str, ...]
    row_groups: np.ndarray
    attribution: np.ndarray
    edit_grad_l1: np.ndarray
    traces: int
    wall_time: float

    def counts(self) -> dict[str, int]:
        return {g: int((self.row_groups == g).sum()) for g in self.groups}

    def gain(self, group: str = "overall") -> np.ndarray:
        rows = self.row_groups != "pass" if group == "overall" else self.row_groups == group
        if group == "pass" or not rows.any():
            raise ValueError(f"no edit rows in group {group!r}; groups present: {self.counts()}")
        return self.attribution[rows].mean(0)

    def collateral(self) -> np.ndarray:
        rows = self.row_groups == "pass"
        if not rows.any():
            raise ValueError(f"lga needs rows of group 'pass' (inputs to keep); groups present: {self.counts()}")
        return np.abs(self.attribution[rows]).mean(0)

    def layer_scores(self, group: str = "overall") -> np.ndarray:
        return self.gain(group) - self.collateral()

    def score_groups(self) -> dict[str, list[float]]:
        out = {}
        for g in [g for g in self.groups if g != "pass"] + ["overall"]:
            out[g] = [float(x) for x in self.layer_scores(g)]
        return out


def lga_scores(
    model: LoadedModel,
    params: Any,
    data: Examples | Iterable[Examples],
    *,
    part: Part = "mlp",
    layers: Sequence[str] | None = None,
    micro_batch: int = 8,
    progress: bool = False,
) -> LGAStats:
    """Layer Gradient Analysis (golden layers), as implemented here - our reading of the paper's
    verbal description ("layer-specific gradient attribution on a proxy set of how strongly a
    layer mediates between the existing and the desired target"); its exact formula is not in our
    sources. Definition, for layer l with tracked weights theta_l (part of the layer table):

      M(x)     margin loss of edit row x (any group but "pass"): `margin_losses`, the log-prob
               of the model's existing answer minus that of the desired target
      G_l      sum over edit rows of grad_{theta_l} M(x)            (pass 1, one batched grad)
      a_l(x)   <sign(G_l), grad_{theta_l} loss(x)>                    (pass 2, per example)
               loss = M for edit rows, the target NLL for "pass" rows
      gain_l(D)     = mean_{x in D} a_l(x)         first-order drop of the margin per unit
                                                   sign step (Adam's first step) on layer l
      collateral_l  = mean_{x in pass} |a_l(x)|    first-order change of a kept input's NLL
      lga_l(D)      = gain_l(D) - collateral_l

    i.e. the first-order effect of one unit sign-gradient step on layer l alone, toward the
    desired targets, minus the damage it does to inputs the model already gets right - a trial
    edit of every layer at the price of two gradient passes. Summed over the layer's parameters,
    so layers of equal shape compare directly. Needs "pass" rows.
    """
    t0 = time.perf_counter()
    names, weights, layer_paths = _tracked(model, params, layers, part)
    checked, groups = _checked_examples(model, data)
    if "pass" not in groups:
        raise ValueError(f"lga needs rows of group 'pass' (inputs to keep); groups present: {groups}")
    if all(g == "pass" for g in groups):
        raise ValueError("lga needs edit rows (groups other than 'pass'); only 'pass' rows were given")
    traces0 = compilations(_lga_pass1, _lga_pass2)
    lp = tuple(layer_paths.values())
    G = {w.path: jnp.zeros(np.shape(get_path(params, w.path)), jnp.float32) for w in weights}
    total = 2 * sum(-(-n // micro_batch) for _, _, n in checked)
    bar = _progress(total, "lga", progress)
    for b, grp, n in checked:
        for s, rows, mb in _micro_batches(b, n, micro_batch):
            w = np.zeros(micro_batch, np.float32)
            w[:rows] = [g != "pass" for g in grp[s : s + rows]]
            G = _lga_pass1(model.apply, G, params, {k: jnp.asarray(v) for k, v in mb.items()}, jnp.asarray(w))
            bar.update(1)
    sG = {q: jnp.sign(v) for q, v in G.items()}
    l1 = np.asarray([sum(float(jnp.abs(G[q]).sum()) for q in ps) for ps in layer_paths.values()])
    attr, row_groups = [], []
    for b, grp, n in checked:
        for s, rows, mb in _micro_batches(b, n, micro_batch):
            is_edit = np.zeros(micro_batch, bool)
            is_edit[:rows] = [g != "pass" for g in grp[s : s + rows]]
            a = _lga_pass2(model.apply, lp, params, sG, {k: jnp.asarray(v) for k, v in mb.items()}, jnp.asarray(is_edit))
            attr.append(np.asarray(a)[:rows])
            bar.update(1)
        row_groups.extend(grp)
    bar.close()
    return LGAStats(
        model=model.name,
        layers=names,
        part=part,
        groups=groups,
        row_groups=np.asarray(row_groups),
        attribution=np.concatenate(attr).astype(np.float64),
        edit_grad_l1=l1,
        traces=compilations(_lga_pass1, _lga_pass2) - traces0,
        wall_time=time.perf_counter() - t0,
    )


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _lga_pass1(apply, G, params, batch, w):
    """G + sum over the micro-batch's edit rows (weight w=1) of grad M(x), tracked weights only."""

    def margin_sum(p):
        logits = apply(p, batch)
        return (margin_losses(logits, batch["labels"], batch["label_mask"]) * w).sum()

    g = jax.grad(margin_sum)(params)
    return {q: G[q] + get_path(g, q).astype(jnp.float32) for q in G}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lga_pass2(apply, layer_paths, params, sG, batch, is_edit):
    """[m, L]: <sign(G_l), grad_l loss(x)> per example (margin for edit rows, NLL for pass rows)."""

    def one(p, ex, edit):
        b = {k: v[None] for k, v in ex.items()}
        logits = apply(p, b)
        m = margin_losses(logits, b["labels"], b["label_mask"])[0]
        nll = example_nll(logits, b["labels"], b["label_mask"])[0]
        return jnp.where(edit, m, nll)

    g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, batch, is_edit)
    per_w = {q: jnp.einsum("m...,...->m", get_path(g, q).astype(jnp.float32), sG[q]) for q in sG}
    return jnp.stack([sum(per_w[q] for q in ps) for ps in layer_paths], -1)


# ----------------------------------------------------------------------------- one call: data -> profile


def saliency_profile(
    model: LoadedModel,
    params: Any,
    data: Examples | Iterable[Examples],
    *,
    scorer: str = "salem",
    part: Part = "mlp",
    top_k: int = 1,
    select_group: str = "fail",
    layers: Sequence[str] | None = None,
    micro_batch: int = 8,
    progress: bool = False,
) -> LayerProfile:
    """Score every layer with `scorer` and choose the top-K on `select_group` (eq. 5).

    For the saliency scorers one streaming pass computes all of "salem", "grad_x_weight",
    "mean_sq", "abs_mean_grad" and (with pass rows) "contrast"; the profile's `scores` are the
    requested scorer's, `extra["scores_by_scorer"]` has the others. "lga" runs `lga_scores`.
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")
    t0 = time.perf_counter()
    if scorer == "lga":
        st = lga_scores(model, params, data, part=part, layers=layers, micro_batch=micro_batch, progress=progress)
        scores = st.score_groups()
        extra = {
            "gain": {g: st.gain(g) for g in [g for g in st.groups if g != "pass"] + ["overall"]},
            "collateral": st.collateral(),
            "traces": st.traces,
            "micro_batch": micro_batch,
        }
        method = "lga"
    else:
        st = saliency_stats(model, params, data, part=part, layers=layers, micro_batch=micro_batch, progress=progress)
        by = {s: st.score_groups(s) for s in SCORERS if s != "lga"}
        scores = by[scorer]
        if not scores:
            raise ValueError(f"scorer {scorer!r} is not defined on the groups given: {st.counts()}")
        extra = {"scores_by_scorer": by, "traces": st.traces, "micro_batch": micro_batch}
        method = "saliency"
    if select_group not in scores:
        raise ValueError(
            f"scorer {scorer!r} has no scores for group {select_group!r}; available: {sorted(scores)} "
            f"(rows per group: {st.counts()})"
        )
    chosen = top_k_layers(scores[select_group], st.layers, top_k)
    return LayerProfile(
        method=method,
        scorer=scorer,
        layers=tuple(st.layers),
        scores=scores,
        chosen=chosen,
        select_group=select_group,
        part=part,
        top_k=top_k,
        examples=st.counts(),
        wall_time=time.perf_counter() - t0,
        model=model.name,
        extra=jsonable(extra),
    )
