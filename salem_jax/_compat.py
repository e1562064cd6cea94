"""The few JAX APIs whose spelling differs between the releases salem-jax supports.

Inside `jax.shard_map` every value carries the set of manual mesh axes it varies over. jax 0.9
calls that type field `vma` (a frozenset of axis names: `jax.typeof(x).vma`,
`jax.ShapeDtypeStruct(..., vma=)`); jax 0.10 replaced it with `manual_axis_type`, an object whose
`.varying` is that frozenset (`jax.ShapeDtypeStruct(..., manual_axis_type=)`). Everything else
salem-jax uses (`jax.shard_map(check_vma=)`, `jax.lax.pcast(to="varying")`, `jax.typeof`) is
spelled the same in both.

The choice is made by feature detection on the installed JAX, never by comparing version strings,
so a release that keeps either spelling keeps working. Pure functions, no state.
"""

from __future__ import annotations

import inspect

import jax

# Which keyword jax.ShapeDtypeStruct takes for the manual-axis type of its values.
_SDS_PARAMS = inspect.signature(jax.ShapeDtypeStruct.__init__).parameters
if "manual_axis_type" in _SDS_PARAMS:  # jax >= 0.10
    _SDS_KEY = "manual_axis_type"
elif "vma" in _SDS_PARAMS:  # jax 0.9
    _SDS_KEY = "vma"
else:  # pragma: no cover - a JAX that has neither cannot run capture inside shard_map
    raise ImportError(
        "salem-jax: this jax.ShapeDtypeStruct takes neither `manual_axis_type=` (jax >= 0.10) nor "
        f"`vma=` (jax 0.9); jax {jax.__version__} is not supported"
    )


def varying_axes(x) -> frozenset:
    """The manual mesh axes `x` varies over (empty outside shard_map).

    `x` is an array, a tracer or a `jax.ShapeDtypeStruct`."""
    t = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", None) or ())


def abstract_like(x) -> jax.ShapeDtypeStruct:
    """Shape, dtype and manual-axis type of an array or tracer, as static metadata only.

    The result holds no tracer, so it may leave a trace (e.g. an `eval_shape` pass under
    `nn.remat`); `varying_axes` reads the varying axes back from it."""
    t = jax.typeof(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, **{_SDS_KEY: getattr(t, _SDS_KEY, None)})
