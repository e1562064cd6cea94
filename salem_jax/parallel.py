"""Devices, meshes and data parallelism, the same way on 1 CPU, a GPU, or a multi-host TPU pod.

The pattern (JAX's successor of `pmap`, which JAX now keeps only for old code):

    mesh = data_mesh()                                   # every device of every host, axis "data"
    step = data_parallel(per_device_fn, mesh,
                         in_specs=(REPLICATED, SHARDED), out_specs=SHARDED)
    out = step(replicate(params, mesh), shard_batch(global_batch, mesh))

(The editor's training step is one jitted function over a `(data, model)` mesh instead:
`mend.train.train_step`; placement helpers live in `salem_jax.sharding`.)

`per_device_fn` sees its slice of the batch (leading axis divided by the number of devices)
and averages its gradients with `jax.lax.pmean(grads, DATA)`. On a pod every host runs the
same program: call `initialize_distributed()` first, and give every host the same global batch
(as numpy); `shard_batch` places each host's slices on its own devices.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from salem_jax import env as salem_env

# The one set of placement helpers is salem_jax.sharding's (imported here for shard_map code).
from salem_jax.sharding import DATA, replicate, shard_batch  # noqa: F401 - re-exported

REPLICATED = P()
SHARDED = P(DATA)

# Environment variables that mean "this process is one of several" (explicit coordinator,
# SLURM, Open MPI, Cloud TPU pod slices, GKE TPU multislice).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _is_multi_process_env(env: dict[str, str]) -> bool:
    if any(env.get(k) for k in _MULTI_PROCESS_ENV):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            pass
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize()` when this process is part of a multi-process job.

    Must run before anything touches a device. Single-process runs (a laptop, one GPU, one TPU
    VM) are left alone. Returns whether it initialised."""
    env = salem_env.process_env() if env is None else env
    if not _is_multi_process_env(env):
        return False
    jax.distributed.initialize()
    return True


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with axis "data"."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices for the mesh")
    # Auto axes (partitioner-chosen intermediate shardings), as `sharding.make_mesh`: the jitted
    # steps take this mesh as well as shard_map does.
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def n_data(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def shard(fn: Callable, mesh: Mesh, *, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map(fn)` over `mesh`: `fn` runs once per device on its shard (call it inside jit).

    Replicated inputs are device-invariant; replicated outputs must be made so inside `fn`
    (e.g. with `jax.lax.pmean(grads, DATA)`), which shard_map checks."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def data_parallel(
    fn: Callable,
    mesh: Mesh,
    *,
    in_specs: Any,
    out_specs: Any,
    donate_argnums: int | Sequence[int] = (),
) -> Callable:
    """`jax.jit(jax.shard_map(fn, ...))`: `fn` runs once per device on its shard.

    Replicated inputs must be device-invariant (same value everywhere) and replicated outputs
    must be made so inside `fn` (e.g. with `jax.lax.pmean(grads, DATA)`); shard_map checks it."""
    return jax.jit(shard(fn, mesh, in_specs=in_specs, out_specs=out_specs), donate_argnums=donate_argnums)


def gather_replicated(tree: Any) -> Any:
    """Inside `shard` / shard_map: concatenate every device's leading-axis slice, in device order,
    into a value that is replicated (device-invariant), so it can leave with a replicated out_spec
    and be read on every host. Each device writes its slice into zeros and the slices are summed
    (`jax.lax.all_gather` results count as per-device values for shard_map's replication check)."""
    idx = jax.lax.axis_index(DATA)
    n = jax.lax.psum(1, DATA)

    def gather(x):
        dtype = x.dtype
        if dtype == jnp.bool_:
            x = x.astype(jnp.int32)
        full = jnp.zeros((n * x.shape[0],) + x.shape[1:], x.dtype)
        full = jax.lax.dynamic_update_slice_in_dim(full, x, idx * x.shape[0], axis=0)
        return jax.lax.psum(full, DATA).astype(dtype)

    return jax.tree.map(gather, tree)


def to_varying(tree: Any) -> Any:
    """Mark replicated values as per-device inside `fn`, so `jax.grad` w.r.t. them gives each
    device's own gradient (to be averaged with `pmean`) instead of an implicit sum."""
    return jax.tree.map(lambda x: jax.lax.pcast(x, (DATA,), to="varying"), tree)


# ----------------------------------------------------------------------------- multi-host helpers


def is_main_process() -> bool:
    """True on the process that writes results (process 0); every process writes checkpoints."""
    return jax.process_index() == 0


def process_rows(global_rows: int, mesh: Mesh) -> slice:
    """The rows of a global batch (leading axis split over "data") that this process feeds.

    Each host loads only these rows and passes them to `host_local_batch`; on one process it is
    every row. The split follows the mesh's device order, whatever the pod's topology."""
    n = n_data(mesh)
    if global_rows % n:
        raise ValueError(f"a global batch of {global_rows} rows cannot be split over {n} data-parallel devices")
    idx = NamedSharding(mesh, SHARDED).addressable_devices_indices_map((global_rows,))
    starts = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop) for i in idx.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError("this process's devices hold non-contiguous rows of the batch; feed it with shard_batch")
    return slice(lo, hi)


def host_local_batch(tree: Any, mesh: Mesh, global_rows: int | None = None) -> Any:
    """Global arrays (leading axis split over "data") from each process's own rows.

    tree: numpy leaves holding this process's rows (`process_rows`), e.g. read from its own
    shard of the data files. On one process this equals `shard_batch(tree, mesh)`.
    global_rows: the global batch size (default: local rows x number of processes)."""
    placement = NamedSharding(mesh, SHARDED)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("batch leaves need a leading (row) axis")
        shape = None if global_rows is None else (global_rows,) + x.shape[1:]
        return jax.make_array_from_process_local_data(placement, x, shape)

    return jax.tree.map(put, tree)


def fetch(tree: Any) -> Any:
    """Host (numpy) copies of every leaf, also of arrays sharded over several hosts' devices
    (gathered over processes; on one process it is `jax.device_get`)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
