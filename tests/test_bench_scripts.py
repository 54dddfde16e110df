"""The GPU benchmark's helpers that can be checked without a GPU: the peak-rate table and gpu.sh's options."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _machine():
    spec = importlib.util.spec_from_file_location("bench_machine", BENCH / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key", [key for key, _, _ in _machine().GPU_PEAKS])
def test_each_gpu_name_finds_its_own_row(key):
    # torch names a GPU "NVIDIA <model> ..."; a shorter key that the name contains must not match first
    # (an NVIDIA GH200 once got the H200's 4.8 TB/s).
    machine = _machine()
    rows = {k: (tflops * 1e12, gbps * 1e9) for k, tflops, gbps in machine.GPU_PEAKS}
    assert machine.gpu_peaks(f"NVIDIA {key} 80GB HBM3") == rows[key]


def test_gpu_peaks_of_an_unknown_gpu_is_none():
    assert _machine().gpu_peaks("NVIDIA GeForce GTX 1080") is None


@pytest.mark.parametrize("args, message", [
    (["--wheels", "no-such-folder"], "no wheels in 'no-such-folder' (--wheels)"),
    (["--wheels"], "no wheels in '' (--wheels)"),
    (["--fast"], "unknown option --fast"),
])
def test_gpu_sh_refuses_bad_options_with_exit_2(tmp_path, args, message):
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), *args], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert done.stdout == ""


def test_gpu_sh_runs_every_benchmark_when_one_fails_and_fails_at_the_end(tmp_path):
    # A lent GPU's minutes are few: a failing benchmark must not stop the ones after it. Here the interpreter
    # gpu.sh finds (python3 on the PATH) fails every script it is given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/sh\necho "ran $1"\nexit 3\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--quick"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert [line for line in done.stdout.splitlines() if line.startswith("ran ")] == [
        "ran bench_train.py", "ran bench_sampler.py", "ran bench_grpo.py"]
    assert "gpu.sh: DPO (quick) failed (exit 3)" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "gpu.sh: failed: DPO (quick) sampler (quick) GRPO (quick)"
