"""Multi-host start-up: join the hosts with jax.distributed.initialize() when the run spans several."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

_MULTI_HOST_HINTS = ("JAX_COORDINATOR_ADDRESS",)


def is_multi_host_environment(env=None) -> bool:
    """Whether the environment describes a run over several processes (TPU pod, SLURM, MPI, explicit)."""
    env = os.environ if env is None else env
    if any(env.get(k) for k in _MULTI_HOST_HINTS):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


_initialized = False


def initialize_distributed() -> bool:
    """Call jax.distributed.initialize() once when the run is multi-host; return whether it did."""
    global _initialized
    if _initialized or not is_multi_host_environment():
        return False
    env = os.environ
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # An explicit cluster: pass what the environment says; otherwise JAX detects TPU pods,
        # SLURM and MPI by itself.
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def host_array(x) -> np.ndarray:
    """The whole of ``x`` as a (writable) numpy array on this host, also when ``x`` spans devices of other hosts
    (each host then contributes its shards: a collective, so every host must call it). Fully addressable
    arrays, fully replicated ones and numpy values are read locally."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.array(multihost_utils.process_allgather(x, tiled=True))
    return np.array(x)


def put_key(key: jax.Array, sharding) -> jax.Array:
    """A typed PRNG key placed with ``sharding``, also on a mesh spanning several hosts: its raw data goes
    through the host (``jax.device_put`` refuses an array committed to this host's device there)."""
    data = jax.device_put(np.asarray(jax.random.key_data(key)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def say(message: str) -> None:
    """Print a status line on process 0 only (every host runs the same command; one copy is enough)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def host_rows(mesh, batch_size: int) -> tuple[int, int] | None:
    """The rows ``lo:hi`` of a ``batch_size``-row batch sharded over (data, fsdp) that this host's devices hold, or
    None when they are not one contiguous block (each host then builds the whole batch)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    spans = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map((batch_size,)).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    return (lo, hi) if covered == hi - lo else None


def count_over_hosts(count: int) -> int:
    """An integer count (below 2**31) summed over every process (a collective: every host must call it)."""
    if jax.process_count() == 1:
        return int(count)
    return int(np.sum(multihost_utils.process_allgather(np.asarray(int(count), np.int32))))
