"""Build a device mesh with the named axes (data, fsdp, tensor) from a spec string."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxalign.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str | dict[str, int] | None) -> dict[str, int]:
    """'data=1,fsdp=-1,tensor=1' -> {'data': 1, 'fsdp': -1, 'tensor': 1}; missing axes are 1."""
    sizes = {axis: 1 for axis in MESH_AXES}
    if spec is None or spec == "":
        sizes["fsdp"] = -1
        return sizes
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in spec.split(","):
            if "=" not in part:
                raise ShardingError(f"--mesh {spec!r}: expected AXIS=SIZE pairs such as 'data=1,fsdp=-1,tensor=1'")
            name, value = part.split("=", 1)
            try:
                items.append((name.strip(), int(value)))
            except ValueError:
                raise ShardingError(f"--mesh {spec!r}: size {value!r} of axis {name.strip()!r} is not an integer") from None
    for name, value in items:
        if name not in MESH_AXES:
            raise ShardingError(f"--mesh: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
        if value == 0 or value < -1:
            raise ShardingError(f"--mesh: axis {name}={value} must be a positive size or -1 (the remaining devices)")
        sizes[name] = value
    if list(sizes.values()).count(-1) > 1:
        raise ShardingError("--mesh: at most one axis may be -1")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over ``devices`` (all devices by default) with axes (data, fsdp, tensor)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise ShardingError(
                f"--mesh {spec!r}: the fixed axes ({known} devices) do not divide the {len(devices)} devices; "
                "choose sizes whose product divides the device count"
            )
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ShardingError(
            f"--mesh {spec!r} needs {total} devices but {len(devices)} are available; "
            "make the sizes multiply to the device count or use -1 for one axis"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU or unusual topologies: plain reshape is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_platform(mesh: Mesh | None) -> str:
    """The platform ("cpu", "gpu", "tpu") a program over ``mesh`` runs on; without a mesh, the default device's."""
    return (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform


def single_device_mesh() -> Mesh:
    """A 1x1x1 mesh on the first device."""
    return make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])


def run_mesh(spec) -> Mesh:
    """The mesh ``--mesh`` asks for. Fixed sizes (no -1 axis) needing fewer devices than a
    single process has run on the first devices (e.g. ``data=1,fsdp=1,tensor=1`` on one of 8)."""
    sizes = parse_mesh_spec(spec)
    devices = jax.devices()
    if -1 not in sizes.values() and jax.process_count() == 1:
        devices = devices[: math.prod(sizes.values())]
    return make_mesh(spec, devices=devices)
