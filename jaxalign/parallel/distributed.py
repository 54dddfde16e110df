"""Multi-host start-up: join the hosts with jax.distributed.initialize() when the run spans several."""

from __future__ import annotations

import os

import jax

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
