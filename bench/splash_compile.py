"""Compile jaxalign's attention ahead of time for a TPU topology on a CPU machine: splash (the Pallas kernel,
under shard_map) against xla and chunked, forward + backward, per-chip temporaries from the compiled program.

Needs libtpu, which jaxalign does not depend on (a separate environment: pip install "jax[tpu]" flax), and
no TPU:

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu PYTHONPATH=. python bench/splash_compile.py \
      [--topology v5e:2x2] [--length 2048] [--json out.json]

Cases: the attention of a Llama-3-8B layer (32/8 heads, head dim 128, bfloat16, 2 rows per chip) with the
batch over fsdp; the same with the heads over tensor; a traced per-layer window under lax.scan (Mistral-style
sliding layers mixed with global ones); and a tiny Decoder's full forward + backward with ``auto``, which must
choose splash. Each case must compile, contain the Mosaic kernel (``tpu_custom_call``) where splash is used,
and (for the layer) need less temporary memory than xla.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.models.attention import NO_WINDOW, attend

KERNEL = "tpu_custom_call"


def topology_mesh(name: str, shape: tuple[int, int, int]) -> Mesh:
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    devices = np.asarray(topo.devices)
    if shape[1] == -1:
        shape = (shape[0], devices.size // (shape[0] * shape[2]), shape[2])
    return Mesh(devices.reshape(shape), ("data", "fsdp", "tensor"))


def attention_case(mesh: Mesh, impl: str, length: int, *, rows_per_chip=2, heads=32, kv_heads=8, head_dim=128,
                   windows=None):
    """Compile grad of sum(attend(...)) for one layer (or a scan over layers with traced ``windows``)."""
    batch_axes = ("data", "fsdp")
    b = rows_per_chip * mesh.shape["data"] * mesh.shape["fsdp"]
    tensor = "tensor" if mesh.shape["tensor"] > 1 else None
    q = jax.ShapeDtypeStruct((b, length, heads, head_dim), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(batch_axes, None, tensor, None)))
    k = jax.ShapeDtypeStruct((b, kv_heads, length, head_dim), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(batch_axes, tensor, None, None)))
    valid = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=NamedSharding(mesh, P(batch_axes, None)))
    static_window = None if windows is None else int(min(windows))

    def loss(q, k, v, valid):
        slots = jnp.arange(length)
        if windows is None:
            out = attend(q, k, v, valid, slots, slots, impl=impl)
            return jnp.sum(out.astype(jnp.float32))

        def layer(x, w):  # the same q, k, v per layer: only the traced window differs
            out = attend(x, k, v, valid, slots, slots, sliding_window=w, impl=impl, static_window=static_window)
            return out, None

        out, _ = jax.lax.scan(layer, q, jnp.asarray(windows, jnp.int32))
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, valid).compile()
        seconds = time.perf_counter() - start
    return compiled, seconds


def model_case(mesh: Mesh, length: int):
    """A tiny Decoder (head dim 128) forward + backward with attn_impl auto under the TPU mesh."""
    from flax import nnx

    from jaxalign.demo.tiny_model import llama_config, random_model

    cfg = llama_config(256, hidden_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=length)
    cfg = dataclasses.replace(cfg, head_dim=128)
    abstract = nnx.eval_shape(lambda: random_model(cfg))
    graphdef, state = nnx.split(abstract)
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    b = 2 * mesh.shape["data"] * mesh.shape["fsdp"]
    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    ids = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch)

    def loss(state, ids, mask):
        model = nnx.merge(graphdef, state)
        return jnp.mean(model(ids, mask))

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss)).lower(state, ids, ids).compile()


def temp_mib(compiled) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    print(f"jax {jax.__version__}; topology {a.topology}; {a.length} tokens, bfloat16, 2 rows per chip")
    results, ok = [], True
    meshes = {"fsdp": topology_mesh(a.topology, (1, -1, 1)), "fsdp+tensor": topology_mesh(a.topology, (1, -1, 2))}
    for mesh_name, mesh in meshes.items():
        temps = {}
        for impl in ("splash", "chunked", "xla"):
            compiled, seconds = attention_case(mesh, impl, a.length)
            temps[impl] = temp_mib(compiled)
            kernel = KERNEL in compiled.as_text()
            ok &= kernel == (impl == "splash")
            results.append({"case": f"layer attention, mesh {mesh_name} {dict(mesh.shape)}", "impl": impl,
                            "temp_mib": temps[impl], "kernel": kernel, "compile_s": seconds})
            print(f"{mesh_name:>12} {impl:>8}: temp {temps[impl]:9.1f} MiB per chip, kernel {kernel}, "
                  f"compiled in {seconds:.1f} s", flush=True)
        ok &= temps["splash"] < temps["xla"]
    compiled, seconds = attention_case(meshes["fsdp"], "splash", a.length, windows=[NO_WINDOW, 512, NO_WINDOW, 512])
    kernel = KERNEL in compiled.as_text()
    ok &= kernel
    results.append({"case": "scan over 4 layers, traced windows [none, 512, none, 512]", "impl": "splash",
                    "temp_mib": temp_mib(compiled), "kernel": kernel, "compile_s": seconds})
    print(f"scan, traced windows: temp {temp_mib(compiled):.1f} MiB per chip, kernel {kernel}", flush=True)
    compiled = model_case(meshes["fsdp+tensor"], a.length)
    kernel = KERNEL in compiled.as_text()
    ok &= kernel
    results.append({"case": "tiny Decoder forward + backward, attn_impl auto", "impl": "auto",
                    "temp_mib": temp_mib(compiled), "kernel": kernel})
    print(f"Decoder, auto: temp {temp_mib(compiled):.1f} MiB per chip, splash kernel chosen: {kernel}")
    print("OK" if ok else "FAILED")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"topology": a.topology, "length": a.length, "results": results}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
