"""Rank-1 gradient factors of chosen weight matrices, captured without touching model code.

For a dense layer `y = x W` (or `y = x W^T` in GPT-2's Conv1D layout) the gradient of a loss
with respect to the kernel is a sum over tokens of outer products,

    dL/dW = sum_t u_t^T delta_t          ("in_out" kernel [in, out])
    dL/dW = sum_t delta_t^T u_t          ("out_in" kernel [out, in])

where `u_t` is the layer's input at token t and `delta_t = dL/dy_t` the gradient with respect
to its output. MEND edits a layer from these two factors, never from the full gradient.

How they are obtained here: `flax.linen.intercept_methods` sees every module call made by
`model.apply`. For each target module (the kernel's path without "/kernel") the interceptor
returns `output + perturbation`, where `perturbation` is a zero array passed in from outside:
the loss does not change, and the gradient of the loss with respect to that perturbation is
exactly `delta`. The input `args[0]` is read the same way, through the backward pass (an
identity whose custom gradient w.r.t. a zero probe is the input itself), so no traced value
escapes by side effect. One forward and one backward pass give every target's `(u, delta)`;
the same code serves all our Flax models (GPT-2, GPT-Neo, T5, BART, BERT, Llama; also with nn.remat),
because it only relies on module paths matching parameter paths.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from salem_jax._compat import abstract_like, varying_axes
from salem_jax.losses import example_nll
from salem_jax.models.base import Weight, get_path

LossFn = Callable[[jax.Array, dict], jax.Array]


class Factors(NamedTuple):
    """Per-token factors of one weight's gradient.

    u:     [B, T, fan_in]   the layer's input
    delta: [B, T, fan_out]  d loss / d layer output (exactly 0 at tokens that cannot affect
                            the loss, e.g. right padding)
    """

    u: jax.Array
    delta: jax.Array


def summed_nll(logits: jax.Array, batch: dict) -> jax.Array:
    """Sum over examples of each example's mean target NLL: scalar.

    Summing (not averaging) over examples keeps every example's `delta` independent of the
    others in the batch, so the factors of a batch of edits are the factors of each edit."""
    return example_nll(logits, batch["labels"], batch["label_mask"]).sum()


def _module_name(context) -> str:
    return "/".join(context.module.path)


def _check_weights(params: Any, weights: Sequence[Weight]) -> None:
    seen = set()
    for w in weights:
        if w.module_path in seen:
            raise ValueError(f"weight {w.path!r} is listed twice")
        seen.add(w.module_path)
        kernel = get_path(params, w.path)
        w.in_out_shape(tuple(kernel.shape))  # raises on a non-2-D kernel


def _io_shapes(apply_fn, params, batch, targets: dict[str, Weight]) -> dict[str, tuple]:
    """(input, output) avals of each target module, from an abstract (compute-free) pass."""
    calls: dict[str, list] = {m: [] for m in targets}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = _module_name(context)
        if context.method_name == "__call__" and name in calls:
            x = args[0] if args else kwargs.get("inputs")
            if x is None:
                raise TypeError(f"module {name!r} was called without a positional input")
            if not hasattr(out, "shape"):
                raise TypeError(f"module {name!r} returned {type(out).__name__}, expected one array")
            # Only static metadata leaves this function, never a tracer: that keeps the pass
            # valid inside lifted transforms (nn.remat, nn.scan) of the model.
            calls[name].append((abstract_like(x), abstract_like(out)))
        return out

    def run(params, batch):
        with nn.intercept_methods(spy):
            apply_fn(params, batch)

    jax.eval_shape(run, params, batch)
    for m, seen in calls.items():
        if len(seen) != 1:
            raise ValueError(
                f"capture needs exactly one call of module {m!r} per forward pass, saw {len(seen)}"
                + ("; check that the weight path matches the model's module names" if not seen else "")
            )
    return {m: seen[0] for m, seen in calls.items()}


def _zeros_like(s: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of the given shape and dtype, varying over the same manual mesh axes.

    Inside `jax.shard_map` (check_vma=True) a value that varies across devices must get a
    perturbation that varies too: the gradient w.r.t. a replicated input is summed over the
    devices, which would turn every device's delta into the sum of all devices' deltas."""
    z = jnp.zeros(s.shape, s.dtype)
    axes = tuple(sorted(varying_axes(s)))
    return jax.lax.pcast(z, axes, to="varying") if axes else z


@jax.custom_vjp
def _tap(x, probe):
    """Identity on x whose "gradient" w.r.t. `probe` (zeros shaped like x) is x itself.

    It reads a layer's input through the backward pass instead of a Python side effect, so
    capture also works where the model wraps its layers in lifted transforms (nn.remat)."""
    del probe
    return x


def _tap_fwd(x, probe):
    del probe
    return x, x


def _tap_bwd(x, g):
    return g, x


_tap.defvjp(_tap_fwd, _tap_bwd)


def capture(
    apply_fn: Callable[[Any, dict], jax.Array],
    params: Any,
    batch: Mapping[str, jax.Array],
    weights: Sequence[Weight],
    loss_fn: LossFn = summed_nll,
) -> tuple[jax.Array, dict[str, Factors]]:
    """Loss and the rank-1 factors of every weight in `weights`, in one forward+backward pass.

    apply_fn: `LoadedModel.apply` (params, batch) -> logits [B, S, V].
    batch:    the library's batch dict (see models/base.py).
    weights:  `Weight`s from the model's layer table (2-D kernels, each module called once).
    loss_fn:  (logits, batch) -> scalar; default `summed_nll`.

    Returns `(loss, {weight.path: Factors(u [B, T, fan_in], delta [B, T, fan_out])})`, with
    `kernel_grad(u, delta, weight.layout)` equal to `jax.grad(loss)` w.r.t. that kernel.
    The factors are constants (no gradient flows back into them).

    Both factors come out of one `jax.value_and_grad`: `delta` is the gradient w.r.t. a zero
    perturbation added to the layer's output, `u` the "gradient" w.r.t. a zero probe on its
    input (`_tap`). Nothing is stored by side effect, so this works under jit, vmap, shard_map
    and inside models that use nn.remat.
    """
    weights = tuple(weights)
    _check_weights(params, weights)
    targets = {w.module_path: w for w in weights}
    batch = dict(batch)
    io = _io_shapes(apply_fn, params, batch, targets)
    probes = {m: _zeros_like(x) for m, (x, _) in io.items()}
    perturbs = {m: _zeros_like(y) for m, (_, y) in io.items()}

    def loss_with_taps(probes, perturbs):
        def interceptor(next_fun, args, kwargs, context):
            name = _module_name(context)
            if context.method_name != "__call__" or name not in perturbs:
                return next_fun(*args, **kwargs)
            if args:
                args = (_tap(args[0], probes[name]),) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "inputs": _tap(kwargs["inputs"], probes[name])}
            return next_fun(*args, **kwargs) + perturbs[name]

        with nn.intercept_methods(interceptor):
            logits = apply_fn(params, batch)
        return loss_fn(logits, batch)

    loss, (inputs, deltas) = jax.value_and_grad(loss_with_taps, argnums=(0, 1))(probes, perturbs)
    out = {}
    for m, w in targets.items():
        fan_in, fan_out = w.in_out_shape(tuple(get_path(params, w.path).shape))
        u, d = inputs[m], deltas[m]
        if u.shape[-1] != fan_in or d.shape[-1] != fan_out:
            raise ValueError(
                f"{w.path}: layer input/output widths {u.shape[-1]}/{d.shape[-1]} do not match the kernel's "
                f"(fan_in, fan_out) = ({fan_in}, {fan_out}) for layout {w.layout!r}; is the layout right?"
            )
        if u.ndim == 2:  # a layer applied to [B, D] (e.g. a classifier head): one token per example
            u, d = u[:, None], d[:, None]
        u = u.reshape(u.shape[0], -1, fan_in)
        d = d.reshape(d.shape[0], -1, fan_out)
        out[w.path] = Factors(jax.lax.stop_gradient(u), jax.lax.stop_gradient(d))
    return jax.lax.stop_gradient(loss), out


def active_tokens(f: Factors) -> jax.Array:
    """[B, T] bool: tokens that contribute to the gradient (u and delta both non-zero).

    Padding and positions that cannot reach the loss have delta exactly 0; like MEND, the
    editor ignores them (it would otherwise turn their zero gradient into a non-zero edit)."""
    return jnp.any(f.u != 0, axis=-1) & jnp.any(f.delta != 0, axis=-1)


def kernel_grad(u: jax.Array, delta: jax.Array, layout: str, mask: jax.Array | None = None) -> jax.Array:
    """sum over tokens of the outer products, in the kernel's stored layout.

    u [..., fan_in], delta [..., fan_out], mask [...] (optional, multiplies each token).
    Returns [fan_in, fan_out] for "in_out", [fan_out, fan_in] for "out_in"."""
    u = u.reshape(-1, u.shape[-1]).astype(jnp.float32)
    delta = delta.reshape(-1, delta.shape[-1]).astype(jnp.float32)
    if mask is not None:
        delta = delta * mask.reshape(-1, 1).astype(jnp.float32)
    if layout == "in_out":
        return jnp.einsum("ti,to->io", u, delta)
    if layout == "out_in":
        return jnp.einsum("to,ti->oi", delta, u)
    raise ValueError(f"unknown kernel layout {layout!r}; expected 'in_out' or 'out_in'")
