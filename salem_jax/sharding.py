"""Where every weight lives on a `(data, model)` device mesh: fully sharded data parallel (FSDP),
optionally tensor parallel for the MLPs.

    mesh = make_mesh(data=2, model=4)                      # 8 devices; make_mesh() = all devices on "data"
    specs = param_specs(model.params, mesh, model=model)   # {path: PartitionSpec}, pytree-shaped
    params = shard_params(model.params, mesh, specs)       # each device holds ~1/8 of every big matrix
    print(describe(params))                                # bytes per device, what was split how

The placement of a leaf, first match wins:

1. `rules`: user `(regex, spec)` pairs matched against the leaf's path ("a/b/kernel"), e.g.
   `(r"embed_tokens", P(None, None))` to keep the embedding whole. The spec is used as given.
2. tensor parallel (`tensor_parallel=True`, needs `model=`): the MLP kernels of the model's layer
   table. The MLP's wide (hidden) axis is split over "model" and the other axis over "data",
   Megatron-style: up-projections are split by output unit, the down-projection by input unit,
   so the hidden activations need no gathering between them. The layer table lists a block's
   MLP weights with the down-projection last (c_fc/c_proj, wi/wo, fc1/fc2, gate/up/down,
   intermediate/output); the hidden width is that weight's fan-in, checked against the others.
3. FSDP (every other leaf): leaves with fewer than `min_size` elements (biases, norms) are
   replicated; otherwise the largest axis divisible by the number of devices is split over all
   devices (`("data", "model")`). If no axis divides, the largest axis divisible by the "data"
   axis size is split over "data"; if none, the leaf is replicated (`describe` lists these).

Nothing here depends on the architecture beyond its layer table, so the rules place every weight
of GPT-2, GPT-Neo, T5, BART, BERT and our Llama alike. Computations take the placed parameters
as they are: under `jax.jit` XLA's partitioner (GSPMD) gathers each weight where it is used and
keeps gradients sharded like the weights, so a model and its gradients take about 1/N of the
memory per device, plus the gathered copies of weights in use. How many of those are alive at
once is up to XLA's scheduler: XLA:CPU (the simulated meshes of the tests and benchmarks)
starts every all-gather at the beginning of the program, so there each device holds every
gathered weight at the peak, i.e. the layers' weights divided only by the "model" axis;
accelerator schedulers place gathers near their use under a memory limit. Re-gathering in the
backward pass (`jax.checkpoint` of the gathered weights) was tried and does not help on CPU:
the second gathers are hoisted too.

The mesh uses `AxisType.Auto` axes (partitioner-chosen intermediate shardings), not the
`Explicit` axes `jax.make_mesh` defaults to: with explicit axes every op on a sharded weight
would need its output sharding spelled out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from salem_jax.models.base import get_path, param_paths

DATA = "data"
MODEL = "model"
ALL = (DATA, MODEL)  # both axes: a dimension split over every device of the mesh

Rule = tuple[str, P]


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D `(data, model)` mesh over `devices` (default: every device of every process).

    data: size of the "data" axis (default: all devices / model). model: size of the "model"
    axis (1 = pure FSDP + data parallel). data * model must equal the number of devices.
    On a pod, `jax.make_mesh` orders the devices so that "model" neighbours share fast links."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model axis of size {model} does not divide the {n} devices")
    data = n // model if data is None else data
    if data * model != n:
        raise ValueError(f"mesh ({data} data x {model} model) needs {data * model} devices, have {n}")
    auto = jax.sharding.AxisType.Auto
    try:
        return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(auto, auto), devices=devices)
    except (ValueError, NotImplementedError):
        # make_mesh's topology-aware ordering refuses some device subsets; keep the given order.
        return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL), axis_types=(auto, auto))


def mesh_size(mesh: Mesh) -> int:
    return int(math.prod(mesh.shape.values()))


def axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape.get(axis, 1))


# ----------------------------------------------------------------------------- specs of one leaf


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int = 2**12) -> P:
    """The FSDP placement of a leaf of `shape` (see the module docstring, rule 3)."""
    rank = len(shape)
    none = [None] * rank
    if rank == 0 or math.prod(shape) < min_size:
        return P(*none)
    order = sorted(range(rank), key=lambda i: -shape[i])  # largest first; ties: earlier axis
    n, nd = mesh_size(mesh), axis_size(mesh, DATA)
    axes = tuple(a for a in ALL if a in mesh.axis_names)
    for want, name in ((n, axes), (nd, DATA)):
        for i in order:
            if want > 1 and shape[i] % want == 0:
                spec = list(none)
                spec[i] = name if len(name) != 1 else name[0]
                return P(*spec)
    return P(*none)


def _mlp_hidden_axes(model, params: Any) -> dict[str, int]:
    """{MLP kernel path: its stored axis that runs over the MLP's hidden units}."""
    out = {}
    for block in model.layers.blocks:
        ws = block.mlp
        if len(ws) < 2:
            continue  # a one-matrix "MLP" has no hidden axis to split
        *ups, down = ws
        hidden = down.in_out_shape(tuple(get_path(params, down.path).shape))[0]
        for w in ups:
            fan_out = w.in_out_shape(tuple(get_path(params, w.path).shape))[1]
            if fan_out != hidden:
                raise ValueError(
                    f"layer {block.name}: MLP weight {w.path} has fan-out {fan_out} but the last MLP weight "
                    f"{down.path} (taken as the down-projection) has fan-in {hidden}; check the layer table's order"
                )
            out[w.path] = 1 if w.layout == "in_out" else 0
        out[down.path] = 0 if down.layout == "in_out" else 1
    return out


def param_specs(
    params: Any,
    mesh: Mesh,
    *,
    model=None,
    tensor_parallel: bool | None = None,
    rules: Sequence[Rule] = (),
    min_size: int = 2**12,
) -> Any:
    """A PartitionSpec for every leaf of `params` (same tree structure).

    model: the `LoadedModel` whose layer table names the MLP kernels (needed for tensor parallel).
    tensor_parallel: split MLP kernels over "model" (default: when the mesh's "model" axis > 1).
    rules: `(regex, PartitionSpec)` pairs tried first, against "a/b/kernel" paths; a rule that
    matches no leaf raises (a typo would otherwise silently replicate a weight)."""
    tp = axis_size(mesh, MODEL) > 1 if tensor_parallel is None else tensor_parallel
    if tp and model is None:
        raise ValueError("tensor_parallel needs model= (its layer table names the MLP kernels)")
    hidden = _mlp_hidden_axes(model, params) if tp else {}
    compiled = [(re.compile(r), s, r) for r, s in rules]
    used = set()
    nm, nd = axis_size(mesh, MODEL), axis_size(mesh, DATA)

    def spec(keypath, leaf):
        path = jax.tree_util.keystr(keypath, simple=True, separator="/")
        shape = tuple(np.shape(leaf))
        for rx, s, raw in compiled:
            if rx.search(path):
                used.add(raw)
                if len(s) > len(shape):
                    raise ValueError(f"rule {raw!r}: spec {s} has more axes than {path} of shape {shape}")
                return s
        if path in hidden and len(shape) == 2 and math.prod(shape) >= min_size:
            h = hidden[path]
            if shape[h] % nm == 0:
                out = [None, None]
                out[h] = MODEL
                if shape[1 - h] % nd == 0 and nd > 1:
                    out[1 - h] = DATA
                return P(*out)
        return fsdp_spec(shape, mesh, min_size)

    specs = jax.tree_util.tree_map_with_path(spec, params)
    unused = [r for _, _, r in compiled if r not in used]
    if unused:
        raise ValueError(f"sharding rules matched no parameter: {unused} (paths look like {param_paths(params)[:3]})")
    return specs


# ----------------------------------------------------------------------------- placing


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` placed by `sharding`; on a pod every process passes the same global value and fills
    its own devices' shards."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array already: reshard it
    # Multi-host: every process holds the whole (host) value and fills its own devices' shards.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params: Any, mesh: Mesh, specs: Any = None, **spec_kwargs) -> Any:
    """`params` placed on `mesh` by `specs` (default `param_specs(params, mesh, **spec_kwargs)`).

    Returns a new tree; the input is not modified (numpy or single-device leaves are copied)."""
    specs = param_specs(params, mesh, **spec_kwargs) if specs is None else specs
    return jax.tree.map(lambda x, s: put(x, NamedSharding(mesh, s)), params, specs)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf as a full copy on each device, spelled `P()` - the spelling jit gives its
    replicated outputs under the partitioner, so a jitted step that takes its own output
    (`mend.train.train_step`) compiles once."""
    return jax.tree.map(lambda x: put(x, NamedSharding(mesh, P())), tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Split every leaf's leading axis over the mesh's "data" axis (it must divide evenly).

    Pass the *global* batch (numpy, identical on every host); on a pod where each host reads
    only its own rows use `parallel.host_local_batch`."""
    n = axis_size(mesh, DATA)

    def place(x):
        if np.ndim(x) == 0 or np.shape(x)[0] % n:
            raise ValueError(f"batch leaf of shape {np.shape(x)} cannot be split over {n} devices along its first axis")
        return put(x, NamedSharding(mesh, P(DATA)))  # spelled as jit spells it (no trailing Nones)

    return jax.tree.map(place, tree)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of a tree placed with NamedShardings over several devices, else None (one device,
    numpy leaves): code that takes parameters as given follows their placement."""
    for leaf in jax.tree.leaves(tree):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, NamedSharding) and len(sh.device_set) > 1:
            return sh.mesh
    return None


def spec_like(x: Any, mesh: Mesh, lead: int = 0) -> P:
    """The spec that places an array of shape [*lead axes, *x.shape] like `x` on `mesh`: `lead`
    unsplit leading axes (per example, per group), then `x`'s own spec padded to its rank
    (nothing split when `x` is not placed on `mesh`). E.g. a kernel on P(None, "model") with
    lead=1 gives P(None, None, "model")."""
    sh = getattr(x, "sharding", None)
    spec = tuple(sh.spec) if isinstance(sh, NamedSharding) and sh.mesh == mesh else ()
    return P(*(None,) * lead, *spec, *(None,) * (np.ndim(x) - len(spec)))


def rows_sharding(mesh: Mesh, n_rows: int) -> NamedSharding:
    """A batch of `n_rows` rows split over the "data" axis when it divides them evenly, else
    replicated (a micro-batch smaller than the data axis)."""
    return NamedSharding(mesh, P(DATA) if n_rows % axis_size(mesh, DATA) == 0 else P())


def shardings(specs: Any, mesh: Mesh) -> Any:
    """The NamedShardings of a spec tree (for `jax.jit(..., in_shardings=...)`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def abstract_params(params: Any, mesh: Mesh, specs: Any) -> Any:
    """ShapeDtypeStructs carrying the placement (orbax restore targets, `.lower()` for memory)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, s)), params, specs
    )


# ----------------------------------------------------------------------------- inspecting


def device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each (local) device holds of the arrays in `tree`."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for s in leaf.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Summary of a placed tree: total bytes, the largest per-device share, replicated leaves."""

    total_bytes: int
    max_device_bytes: int
    n_devices: int
    replicated: tuple[str, ...]  # paths of leaves kept whole on every device
    replicated_bytes: int

    def __str__(self) -> str:
        return (
            f"{self.total_bytes / 2**20:.1f} MiB of parameters, at most {self.max_device_bytes / 2**20:.1f} MiB per device "
            f"on {self.n_devices} devices (ideal {self.total_bytes / self.n_devices / 2**20:.1f}); "
            f"{len(self.replicated)} leaves replicated ({self.replicated_bytes / 2**20:.2f} MiB each device)"
        )


def describe(tree: Any) -> Placement:
    """How a placed tree (of jax.Arrays) is spread over the devices."""
    replicated, rep_bytes, total = [], 0, 0
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        total += leaf.nbytes
        if leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
            replicated.append(jax.tree_util.keystr(keypath, simple=True, separator="/"))
            rep_bytes += leaf.nbytes
    per = device_bytes(tree)
    return Placement(total, max(per.values()) if per else 0, len(per), tuple(replicated), rep_bytes)
