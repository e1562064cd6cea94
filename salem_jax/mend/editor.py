"""MEND's editor network: it turns a layer's rank-1 gradient factors into a weight edit.

For every edited weight W (fan_in x fan_out) the capture gives per-token factors `u` [T, in]
and `delta` [T, out] (capture.py). The editor

1. normalises them with running statistics of that weight (zero mean, unit variance; the
   statistics move only in training - `update_norm_state` - and are frozen when editing),
2. passes them through a small MLP shared by all edited weights of the same (fan_in, fan_out)
   shape, conditioned on the weight by a learned per-weight scale and shift,
3. forms the pseudo-gradient `G~ = sum_t u~_t^T delta~_t` (in the kernel's stored layout), and
4. returns `W - lr_W * G~` with a learned scalar `lr_W` per weight (with a null-space projector
   P per weight, `W - lr_W * P G~`: `pseudo_grads`' `projections`, TrainConfig.null_energy).

Sign convention: with `lr_W > 0` the edit moves *against* the pseudo-gradient, like a step
of gradient descent. At initialisation the MLP is the identity, so without normalisation the
first edit is exactly one fine-tuning step `W - lr_W * dL/dW` (MEND's code writes
`W + lr * G~` and lets training find the sign; ours starts out as descent).

The MLP (MEND's "IDMLP"): `n_hidden + 1` residual low-rank layers
`x <- x + act(U (V (x * scale_W + shift_W)) + b)` (ReLU on hidden layers, none on the last),
with U zero and V Xavier at init, so the network starts as the exact identity whatever the
scale/shift. Modes (MEND's options):
  "combined"   one MLP on concat[u~, delta~] (width in + out)       (default, MEND's `combine`)
  "one_sided"  transform only the smaller of u~ / delta~, pass the other through
  "x_only"     transform u~ only        "delta_only"  transform delta~ only

Trees (plain dicts, so optax, orbax and jax.tree work on them):
  params = {"nets": {"<in>x<out>": {side: {"layer<j>": {"U", "V", "b", "scale", "shift"}}}},
            "lr": {weight_key: scalar}}
           `scale`/`shift` are [n_weights_of_that_shape, width]: row m conditions weight m.
  state  = {"norm": {weight_key: {"count", "u_mean", "u_m2", "d_mean", "d_m2"}}}
           (non-trainable; kept apart from params so optimisers never touch it).
Running statistics are kept per weight (MEND shares them per shape because its modules are
shared; per weight keeps each layer standardised even when layers of one shape differ in scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax.mend.capture import Factors, active_tokens, kernel_grad
from salem_jax.models.base import Weight, get_path, set_path

Mode = Literal["combined", "one_sided", "x_only", "delta_only"]
MODES = ("combined", "one_sided", "x_only", "delta_only")


@dataclasses.dataclass(frozen=True)
class EditorConfig:
    """Hyper-parameters of the editor network (MEND's defaults)."""

    rank: int = 1920  # inner width of each low-rank layer (clamped to the layer's width)
    n_hidden: int = 1  # hidden (ReLU) layers; the network has n_hidden + 1 low-rank layers
    mode: Mode = "combined"
    edit_lr_init: float = 1e-4  # initial lr_W of every weight
    normalize: bool = True  # standardise u and delta with running statistics
    norm_eps: float = 1e-7  # added to the standard deviation

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"EditorConfig.mode = {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.rank < 1 or self.n_hidden < 0:
            raise ValueError(f"EditorConfig: rank must be >= 1 and n_hidden >= 0 (got {self.rank}, {self.n_hidden})")


def weight_key(path: str) -> str:
    """Key of a weight in the editor's trees: its path with dots ("transformer.h.3.mlp.c_fc.kernel")."""
    return path.replace("/", ".")


@dataclasses.dataclass(frozen=True)
class EditorSpec:
    """The static description of an editor: which weights, their stored shapes, the config.

    Hashable, so it can be closed over by jitted functions; `to_dict`/`from_dict` round-trip it
    through checkpoint metadata."""

    weights: tuple[Weight, ...]
    shapes: tuple[tuple[int, int], ...]  # stored kernel shapes, one per weight
    config: EditorConfig = EditorConfig()

    def __post_init__(self):
        if not self.weights:
            raise ValueError("an editor needs at least one weight to edit")
        if len(self.weights) != len(self.shapes):
            raise ValueError(f"{len(self.weights)} weights but {len(self.shapes)} shapes")
        if len({w.path for w in self.weights}) != len(self.weights):
            raise ValueError("a weight is listed twice")

    @classmethod
    def from_params(cls, weights: Sequence[Weight], params: Any, config: EditorConfig = EditorConfig()) -> "EditorSpec":
        shapes = []
        for w in weights:
            shape = tuple(int(s) for s in get_path(params, w.path).shape)
            w.in_out_shape(shape)
            shapes.append(shape)
        return cls(tuple(weights), tuple(shapes), config)

    def fans(self, i: int) -> tuple[int, int]:
        return self.weights[i].in_out_shape(self.shapes[i])

    def shape_key(self, i: int) -> str:
        fan_in, fan_out = self.fans(i)
        return f"{fan_in}x{fan_out}"

    def shape_groups(self) -> dict[str, list[int]]:
        """shape key -> indices of the weights sharing that editor MLP (in order)."""
        groups: dict[str, list[int]] = {}
        for i in range(len(self.weights)):
            groups.setdefault(self.shape_key(i), []).append(i)
        return groups

    def mode_index(self, i: int) -> int:
        """Row of weight i in its shared MLP's scale/shift tables."""
        return self.shape_groups()[self.shape_key(i)].index(i)

    def sides(self, i: int) -> tuple[str, ...]:
        """Which MLPs this weight's shape has: ("xd",) combined, else a subset of ("x", "delta")."""
        mode = self.config.mode
        if mode == "combined":
            return ("xd",)
        if mode == "x_only":
            return ("x",)
        if mode == "delta_only":
            return ("delta",)
        fan_in, fan_out = self.fans(i)
        return ("delta",) if fan_in > fan_out else ("x",)

    def to_dict(self) -> dict:
        return {
            "weights": [{"path": w.path, "layout": w.layout} for w in self.weights],
            "shapes": [list(s) for s in self.shapes],
            "config": dataclasses.asdict(self.config),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "EditorSpec":
        return cls(
            tuple(Weight(w["path"], w["layout"]) for w in d["weights"]),
            tuple(tuple(int(x) for x in s) for s in d["shapes"]),
            EditorConfig(**d["config"]),
        )


# ---------------------------------------------------------------------------- initialisation


def _side_width(spec: EditorSpec, i: int, side: str) -> int:
    fan_in, fan_out = spec.fans(i)
    return {"xd": fan_in + fan_out, "x": fan_in, "delta": fan_out}[side]


def _init_mlp(rng: jax.Array, width: int, n_modes: int, cfg: EditorConfig) -> dict:
    rank = min(cfg.rank, width)
    layers = {}
    for j, key in enumerate(jax.random.split(rng, cfg.n_hidden + 1)):
        layers[f"layer{j}"] = {
            "U": jnp.zeros((width, rank), jnp.float32),  # zero: the residual branch starts at 0
            "V": jax.nn.initializers.glorot_uniform()(key, (rank, width), jnp.float32),
            "b": jnp.zeros((width,), jnp.float32),
            "scale": jnp.ones((n_modes, width), jnp.float32),
            "shift": jnp.zeros((n_modes, width), jnp.float32),
        }
    return layers


def init_editor(spec: EditorSpec, rng: jax.Array) -> tuple[dict, dict]:
    """Fresh editor `(params, state)`: identity MLPs, lr_W = edit_lr_init, empty statistics."""
    nets = {}
    groups = spec.shape_groups()
    for n, (key, idx) in enumerate(groups.items()):
        i = idx[0]
        nets[key] = {
            side: _init_mlp(jax.random.fold_in(rng, 2 * n + s), _side_width(spec, i, side), len(idx), spec.config)
            for s, side in enumerate(spec.sides(i))
        }
    lr = {weight_key(w.path): jnp.asarray(spec.config.edit_lr_init, jnp.float32) for w in spec.weights}
    norm = {}
    for i, w in enumerate(spec.weights):
        fan_in, fan_out = spec.fans(i)
        norm[weight_key(w.path)] = {
            "count": jnp.zeros((), jnp.float32),
            "u_mean": jnp.zeros((fan_in,), jnp.float32),
            "u_m2": jnp.zeros((fan_in,), jnp.float32),
            "d_mean": jnp.zeros((fan_out,), jnp.float32),
            "d_m2": jnp.zeros((fan_out,), jnp.float32),
        }
    return {"nets": nets, "lr": lr}, {"norm": norm}


def param_labels(params: dict) -> dict:
    """"lr" for the per-weight edit learning rates, "net" for everything else (for optax.partition)."""
    return {"nets": jax.tree.map(lambda _: "net", params["nets"]), "lr": jax.tree.map(lambda _: "lr", params["lr"])}


# ---------------------------------------------------------------------------- running statistics


def _merge(count, mean, m2, n, b_mean, b_m2):
    """Chan et al.'s parallel merge of (count, mean, M2) with a batch's (n, mean, M2)."""
    total = count + n
    safe = jnp.maximum(total, 1.0)
    d = b_mean - mean
    new_mean = mean + d * (n / safe)
    new_m2 = m2 + b_m2 + d * d * (count * n / safe)
    return total, new_mean, new_m2


def _batch_moments(x: jax.Array, mask: jax.Array, axis_name: str | None):
    """(n, mean, M2) of the masked rows of x [N, D], combined over `axis_name` devices if given."""
    x = x.astype(jnp.float32)
    m = mask.astype(jnp.float32)[:, None]
    n = m.sum()
    mean = (x * m).sum(0) / jnp.maximum(n, 1.0)
    m2 = (((x - mean) * m) ** 2).sum(0)
    if axis_name is None:
        return n, mean, m2
    n_all = jax.lax.psum(n, axis_name)
    mean_all = jax.lax.psum(n * mean, axis_name) / jnp.maximum(n_all, 1.0)
    m2_all = jax.lax.psum(m2 + n * (mean - mean_all) ** 2, axis_name)
    return n_all, mean_all, m2_all


def update_norm_state(spec: EditorSpec, state: dict, factors: Mapping[str, Factors], axis_name: str | None = None) -> dict:
    """Fold the active tokens of `factors` into the running statistics (training only).

    factors: {weight.path: Factors} with any leading dims ([..., T, D]); only tokens with
    non-zero u and delta count. With `axis_name`, tokens of every device on that mesh axis are
    combined, so all replicas keep identical statistics."""
    norm = dict(state["norm"])
    for w in spec.weights:
        f = factors[w.path]
        mask = active_tokens(f).reshape(-1)
        u = f.u.reshape(-1, f.u.shape[-1])
        d = f.delta.reshape(-1, f.delta.shape[-1])
        s = norm[weight_key(w.path)]
        nu, mu_u, m2_u = _batch_moments(u, mask, axis_name)
        nd, mu_d, m2_d = _batch_moments(d, mask, axis_name)
        count, u_mean, u_m2 = _merge(s["count"], s["u_mean"], s["u_m2"], nu, mu_u, m2_u)
        _, d_mean, d_m2 = _merge(s["count"], s["d_mean"], s["d_m2"], nd, mu_d, m2_d)
        norm[weight_key(w.path)] = {"count": count, "u_mean": u_mean, "u_m2": u_m2, "d_mean": d_mean, "d_m2": d_m2}
    return {**state, "norm": norm}


def _standardize(x, mean, m2, count, eps):
    # Fewer than two tokens seen (a fresh editor): no statistics yet, leave the input as is.
    ready = count >= 2
    std = jnp.sqrt(m2 / jnp.maximum(count - 1.0, 1.0))
    return jnp.where(ready, (x - mean) / (std + eps), x)


# ---------------------------------------------------------------------------- the network


def _mlp(layers: dict, x: jax.Array, mode) -> jax.Array:
    """x [N, D] -> [N, D]; the residual low-rank MLP conditioned on `mode`: one row of the
    scale/shift tables for every row of x (an int), or a row per row of x (an int array [N])."""
    n = len(layers)
    for j in range(n):
        p = layers[f"layer{j}"]
        h = x * p["scale"][mode] + p["shift"][mode]
        h = (h @ p["V"].T) @ p["U"].T + p["b"]
        if j < n - 1:
            # ReLU whose gradient is 1 at exactly 0 (like torch's clamp(min=0) in MEND): at
            # init U = 0 and b = 0 make every pre-activation exactly 0, and jax.nn.relu's zero
            # gradient there would leave the hidden layers untrainable forever.
            h = jnp.where(h >= 0, h, 0.0)
        x = x + h
    return x


def _mlp_shared(layers: dict, xs: list[jax.Array], modes: list[int]) -> list[jax.Array]:
    """`_mlp(layers, xs[k], modes[k])` for every k, as one pass over the rows of all of them.

    Why: the kernels that share an MLP (one shape; e.g. gate and up of every edited block) each
    ran it on their own tokens, reading its weights (2 x D x rank per layer: 65 MB for SmolLM2's
    2112-wide rank-1920 net) once per kernel; an edit of a few tokens is bound by those reads
    (benchmarks/edit_roofline.py). Stacking the rows reads them once. Every row still meets its
    own kernel's scale and shift, so each output row is the same function of its input row."""
    if len(xs) == 1:
        return [_mlp(layers, xs[0], modes[0])]
    sizes = [x.shape[0] for x in xs]
    # a host array: it indexes host (numpy) tables as well as traced ones, inside jit or not
    rows = np.repeat(np.asarray(modes, np.int32), sizes)
    y = _mlp(layers, jnp.concatenate(xs, 0), rows)
    return jnp.split(y, np.cumsum(sizes)[:-1], axis=0)


def transform_factors(spec: EditorSpec, params: dict, state: dict, factors: Mapping[str, Factors]) -> dict[str, Factors]:
    """The editor's output factors (u~ [.., T, in], delta~ [.., T, out]) for every weight.

    Inactive tokens (see `capture.active_tokens`) come out as zeros. The weights that share an
    MLP (`EditorSpec.shape_groups`) go through it in one pass (`_mlp_shared`)."""
    cfg = spec.config
    inputs = {}
    for w in spec.weights:
        f = factors[w.path]
        u = f.u.reshape(-1, f.u.shape[-1]).astype(jnp.float32)
        d = f.delta.reshape(-1, f.delta.shape[-1]).astype(jnp.float32)
        if cfg.normalize:
            s = state["norm"][weight_key(w.path)]
            u = _standardize(u, s["u_mean"], s["u_m2"], s["count"], cfg.norm_eps)
            d = _standardize(d, s["d_mean"], s["d_m2"], s["count"], cfg.norm_eps)
        inputs[w.path] = [u, d]
    for key, idx in spec.shape_groups().items():
        net = params["nets"][key]
        ws = [spec.weights[i] for i in idx]
        modes = [spec.mode_index(i) for i in idx]
        if "xd" in net:
            ys = _mlp_shared(net["xd"], [jnp.concatenate(inputs[w.path], -1) for w in ws], modes)
            for w, y in zip(ws, ys):
                width = inputs[w.path][0].shape[-1]
                inputs[w.path] = [y[:, :width], y[:, width:]]
            continue
        for side, k in (("x", 0), ("delta", 1)):
            if side in net:
                ys = _mlp_shared(net[side], [inputs[w.path][k] for w in ws], modes)
                for w, y in zip(ws, ys):
                    inputs[w.path][k] = y
    out = {}
    for w in spec.weights:
        f = factors[w.path]
        lead = f.u.shape[:-1]
        mask = active_tokens(f).reshape(-1, 1).astype(jnp.float32)
        u, d = inputs[w.path]
        out[w.path] = Factors((u * mask).reshape(*lead, -1), (d * mask).reshape(*lead, -1))
    return out


def project_input_factor(u: jax.Array, projection: jax.Array, layout: str) -> jax.Array:
    """u~ [..., in] with the input-side projection P [in, in] applied so that the pseudo-gradient
    built from it is the projected one: `kernel_grad(u P^T, delta, "in_out") = P G~` for a kernel
    stored [in, out], `kernel_grad(u P, delta, "out_in") = G~ P` for one stored [out, in] - the
    same sides as `nullspace.project_delta` (P is symmetric; the transposes only make the two
    agree to the last bit of the product's definition). Costs T x in^2 per kernel, where
    projecting G~ itself would cost in^2 x out."""
    p = jnp.asarray(projection, jnp.float32)
    if p.shape != (u.shape[-1], u.shape[-1]):
        raise ValueError(f"null-space projection of shape {p.shape} does not match input factors of width {u.shape[-1]}")
    if layout == "in_out":
        return u @ p.T
    if layout == "out_in":
        return u @ p
    raise ValueError(f"unknown kernel layout {layout!r}; expected 'in_out' or 'out_in'")


def pseudo_grads(spec: EditorSpec, params: dict, state: dict, factors: Mapping[str, Factors],
                 projections: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """{weight.path: sum_t u~_t^T delta~_t} in each kernel's stored layout and shape.

    projections: {weight.path: P [in, in]} (AlphaEdit's null-space projector of that kernel's
    input covariance, `mend.nullspace`; TrainConfig.null_energy): the pseudo-gradient becomes
    P G~ on the input side (`project_input_factor`: u~ projected before the outer product), so
    that for any input k with P k = 0 the edit leaves k W unchanged. None (the default): no
    projection, the very same arithmetic as without the argument."""
    new = transform_factors(spec, params, state, factors)
    if projections is not None:
        missing = [w.path for w in spec.weights if w.path not in projections]
        if missing:
            raise ValueError(f"null-space projections are missing for edited weights {missing}")
        new = {w.path: Factors(project_input_factor(new[w.path].u, projections[w.path], w.layout), new[w.path].delta)
               for w in spec.weights}
    return {w.path: kernel_grad(new[w.path].u, new[w.path].delta, w.layout) for w in spec.weights}


def edited_params(spec: EditorSpec, params: dict, state: dict, base_params: Any, factors: Mapping[str, Factors],
                  projections: Mapping[str, jax.Array] | None = None) -> Any:
    """A new parameter tree: each edited kernel W becomes `W - lr_W * pseudo_grad` (with
    `projections`, `W - lr_W * P pseudo_grad`: `pseudo_grads`).

    `base_params` is not modified (the result shares every untouched leaf with it). Factors
    come from `capture.capture` on the edit examples (leading dims are summed over, so a batch
    of edits gives one combined edit)."""
    grads = pseudo_grads(spec, params, state, factors, projections)
    new = base_params
    for w in spec.weights:
        kernel = get_path(base_params, w.path)
        lr = params["lr"][weight_key(w.path)]
        new = set_path(new, w.path, (kernel.astype(jnp.float32) - lr * grads[w.path]).astype(kernel.dtype))
    return new
