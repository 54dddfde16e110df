"""Mesh, logical-axis rules, shardings and multi-host start-up."""

from jaxalign.parallel.distributed import initialize_distributed, is_multi_host_environment
from jaxalign.parallel.mesh import MESH_AXES, make_mesh, mesh_platform, parse_mesh_spec, run_mesh, single_device_mesh
from jaxalign.parallel.rules import DEFAULT_RULES, batch_sharding, logical_to_spec, param_shardings, replicated

__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "make_mesh", "mesh_platform", "run_mesh", "parse_mesh_spec", "single_device_mesh",
    "logical_to_spec", "param_shardings", "batch_sharding", "replicated", "initialize_distributed",
    "is_multi_host_environment",
]
