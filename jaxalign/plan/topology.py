"""`--topology`: the devices `jaxalign plan` compiles for, and what each chip offers.

A TPU name (``v5e:4x4``, ``v5p:2x2x4``, ``v6e:8x8``, ...) becomes libtpu's compile-only devices for
that slice (``jax.experimental.topologies``; needs ``pip install "jax[tpu]"``, no TPU attached);
``cpu:N`` becomes N host CPU devices (simulated; the count is set before JAX starts its backends).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jaxalign.errors import ConfigError

GIB = 1024**3

# Per chip: peak dense bfloat16 FLOP/s and HBM, from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS: dict[str, tuple[float, int]] = {
    "v4": (275e12, 32 * GIB),
    "v5e": (197e12, 16 * GIB),
    "v5p": (459e12, 95 * GIB),
    "v6e": (918e12, 32 * GIB),
}
CHIP_SOURCE = "Google Cloud's TPU system-architecture pages, cloud.google.com/tpu/docs/<generation>"

_TPU_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){0,2})$")
EXAMPLES = "v5e:2x2, v5e:4x4, v5e:8x8, v5p:2x2x2, v5p:2x2x4, v6e:4x4, or cpu:N"


@dataclasses.dataclass
class Topology:
    """The devices of a ``--topology`` and, for a known TPU generation, each chip's figures."""

    name: str
    platform: str  # "tpu" or "cpu"
    devices: list
    chips: int
    peak_flops: float | None = None  # per chip, bfloat16
    hbm_bytes: int | None = None  # per chip

    @property
    def per_device(self) -> float:
        """Chips per device (1 where each chip is one JAX device)."""
        return self.chips / len(self.devices)

    @property
    def device_hbm(self) -> float | None:
        return None if self.hbm_bytes is None else self.hbm_bytes * self.per_device

    @property
    def device_peak(self) -> float | None:
        return None if self.peak_flops is None else self.peak_flops * self.per_device


def parse(name: str) -> tuple[str, str, tuple[int, ...]]:
    """``("tpu", generation, dims)`` or ``("cpu", "cpu", (N,))``; a malformed name is a one-line error."""
    name = (name or "").strip()
    if name.startswith("cpu:"):
        try:
            n = int(name[4:])
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--topology {name}: cpu:N needs a positive device count, e.g. cpu:8")
        return "cpu", "cpu", (n,)
    m = _TPU_NAME.match(name)
    if not m:
        raise ConfigError(f"--topology {name!r}: not a topology name; use a TPU slice such as {EXAMPLES}")
    return "tpu", m.group(1), tuple(int(d) for d in m.group(2).split("x"))


def prepare_environment(name: str) -> None:
    """Settings that must be in place before JAX starts a backend or libtpu loads: compile on the host (a
    TPU VM's own chips are not needed), let libtpu load beside another user of it, and let an oversize
    program compile so its size can be reported."""
    platform, _, _ = parse(name)
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        try:
            jax.config.update("jax_platforms", "cpu")
        except Exception:  # noqa: BLE001 - backends already started: keep them
            pass
    if platform == "tpu":
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if "xla_tpu_max_hbm_size_mib" not in os.environ.get("LIBTPU_INIT_ARGS", ""):
            os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "")
                                              + " --xla_tpu_max_hbm_size_mib=1048576").strip()


def _configured_cpu_devices() -> int:
    """CPU devices the process will have, from ``jax_num_cpu_devices`` or XLA_FLAGS (read without starting
    a backend)."""
    import jax

    n = int(getattr(jax.config, "jax_num_cpu_devices", -1) or -1)
    if n > 0:
        return n
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def cpu_devices(n: int) -> list:
    """The first ``n`` host CPU devices; asks JAX for ``n`` when its backends have not started yet."""
    import jax

    if _configured_cpu_devices() < n:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # backends already running: use what they have
            pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ConfigError(
            f"--topology cpu:{n}: this process already started JAX with {len(devices)} CPU devices; run "
            f"`jaxalign plan` in a fresh process (or set XLA_FLAGS=--xla_force_host_platform_device_count={n})"
        )
    return list(devices[:n])


def tpu_devices(name: str, dims: tuple[int, ...]) -> list:
    """libtpu's compile-only devices for the slice ``name``."""
    try:
        import libtpu  # noqa: F401 - only to say what is missing
    except ImportError:
        raise ConfigError(f"--topology {name}: compiling for a TPU needs libtpu; pip install \"jax[tpu]\" "
                          "(no TPU has to be attached), or plan with --topology cpu:N") from None
    from jax.experimental import topologies

    bounds = tuple(min(2, d) for d in dims[:2]) + (1,)
    bounds = bounds + (1,) * (3 - len(bounds))
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu's message, in one line
        msg = " ".join(str(e).split())
        if "not installed" in msg:
            raise ConfigError(f"--topology {name}: compiling for a TPU needs libtpu; pip install \"jax[tpu]\"") from None
        raise ConfigError(f"--topology {name}: libtpu refused it ({msg[:300]}); use a slice such as {EXAMPLES}") from None
    return list(topo.devices)


def load(name: str) -> Topology:
    """The devices and chip figures of ``--topology``."""
    platform, generation, dims = parse(name)
    if platform == "cpu":
        return Topology(name, "cpu", cpu_devices(dims[0]), chips=dims[0])
    devices = tpu_devices(name, dims)
    peak, hbm = CHIPS.get(generation, (None, None))
    return Topology(name, "tpu", devices, chips=math.prod(dims), peak_flops=peak, hbm_bytes=hbm)
