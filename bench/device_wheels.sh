#!/usr/bin/env bash
# The Python packages bench/gpu.sh needs that a GPU machine without network access may lack, as wheels to carry
# there: TRL (the peer), the datasets stack TRL's trainers take their data from, and jaxalign's own pure-Python
# dependencies. Run it where pip reaches PyPI; on the GPU machine `bash bench/gpu.sh --wheels DIR` installs them
# (without their dependencies) into a private folder and runs the benchmarks from this checkout.
#
#   bash bench/device_wheels.sh [DIR] [PYTHON_VERSION]     DIR defaults to .whl, PYTHON_VERSION to 3.12
#
# The pins fit a CUDA image that already holds jax (CUDA build), flax, optax, orbax-checkpoint, torch,
# transformers 5.x with huggingface_hub 1.x, accelerate, tokenizers, safetensors, pyarrow, pandas and sympy:
# datasets 4.8 is the last line that accepts huggingface_hub < 2. About 2.2 MB in all.
set -euo pipefail
dir="${1:-.whl}"
version="${2:-3.12}"
wheels=(
  trl==1.16.0                     # the GRPO and DPO peer; tests/test_trl_parity.py checks TRL 1.16's meanings
  datasets==4.8.5                 # TRL's trainers take datasets.Dataset
  dill==0.4.0                     # datasets' pickling
  multiprocess==0.70.18
  ml-collections==1.1.0           # jaxalign.config
  math-verify==0.9.0              # jaxalign's accuracy reward
  latex2sympy2-extended==1.11.0
  antlr4-python3-runtime==4.13.2
)
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${wheels[@]}"
ls "$dir"
