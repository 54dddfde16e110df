"""What the benchmark scripts print about the machine they ran on, and the model shapes they share."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Dense bfloat16 peak (TFLOP/s, no sparsity) and HBM bandwidth (GB/s) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins, so a name comes before any name it contains.
GPU_PEAKS = [
    ("GH200", 989.0, 4000.0),  # before "H200", which its name contains
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),
    ("B200", 2250.0, 8000.0),
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100", 312.0, 1555.0),
    ("L40S", 362.0, 864.0),
    ("L4", 121.0, 300.0),
    ("A10G", 70.0, 600.0),
    ("RTX 4090", 165.0, 1008.0),
]


def gpu_peaks(name: str) -> tuple[float, float] | None:
    """(bf16 FLOP/s, HBM bytes/s) of a GPU by its device name, or None when it is not in the table."""
    for key, tflops, gbps in GPU_PEAKS:
        if key.lower() in name.lower():
            return tflops * 1e12, gbps * 1e9
    return None


# Random-weight model shapes the benchmarks can build (transformers config class, its arguments).
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                         tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                         tie_word_embeddings=True)),
}
