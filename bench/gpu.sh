#!/usr/bin/env bash
# The GPU benchmarks in one go: DPO training, the sampler and GRPO, jaxalign against TRL and transformers.generate
# on the same GPU, in bfloat16, on random-weight models of Qwen2.5-0.5B's shape (built here; nothing downloaded).
# Prints MFU against the GPU's dense bfloat16 peak and decode bandwidth against its HBM bandwidth
# (bench/machine.py's table). Budget: about 8 minutes on an H100-class GPU.
#
#   bash bench/gpu.sh                on a GPU machine with jaxalign installed with `pip install -e ".[cuda]"` and trl
#   bash bench/gpu.sh --wheels DIR   on a GPU machine without network access whose image already holds jax's CUDA
#                                    build, torch and transformers: installs the wheels bench/device_wheels.sh
#                                    fetched into DIR (TRL, datasets, ...) into a private folder, without their
#                                    dependencies, and runs jaxalign from this checkout
#   bash bench/gpu.sh --quick        tiny shapes on the CPU: checks that every script runs (a few minutes on 2 cores)
#   bash bench/gpu.sh --quick --wheels DIR   the same, with the carried wheels
set -euo pipefail
start="$PWD"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/bench"
python="$(command -v python3 || command -v python)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # jaxalign from this checkout, installed or not

quick=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --wheels)
      dir="${2:-}"
      wheels="$(cd "$start" && cd "$dir" 2> /dev/null && pwd)" && compgen -G "$wheels/*.whl" > /dev/null || {
        echo "gpu.sh: no wheels in '$dir' (--wheels); fetch them with bash bench/device_wheels.sh DIR where pip reaches PyPI" >&2
        exit 2
      }
      site="$(mktemp -d /tmp/jaxalign-site.XXXX)"
      trap 'rm -rf "$site"' EXIT
      "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
      export PYTHONPATH="$site:$PYTHONPATH"
      shift 2 ;;
    *) echo "gpu.sh: unknown option $1 (use --quick and/or --wheels DIR)" >&2; exit 2 ;;
  esac
done

# Each benchmark runs even when one before it failed (a lent GPU's minutes are few); gpu.sh fails at the end.
failed=()
run() {  # run NAME COMMAND...
  local name="$1"
  shift
  echo "== $name"
  "$@" || { echo "gpu.sh: $name failed (exit $?)" >&2; failed+=("$name"); }
}
finish() {
  if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu.sh: failed: ${failed[*]}" >&2
    exit 1
  fi
  echo "gpu.sh$1: every benchmark ran"
}

if [[ $quick == 1 ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  run "DPO (quick)" "$python" bench_train.py --quick
  run "sampler (quick)" "$python" bench_sampler.py --quick
  run "GRPO (quick)" "$python" bench_grpo.py --quick --random_size 64,2 --max_completion_length 16
  finish " --quick"
  exit 0
fi

if ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu.sh: jax sees no GPU; install its CUDA build with pip install -e \".[cuda]\" (and pip install trl), or use an image that has it" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
"$python" -c "import jax, torch, transformers, trl; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # jax and torch share the GPU in one process

run "DPO, Qwen2.5-0.5B shape, bf16, 8 pairs x 2 x 512 tokens" \
  timeout 200 "$python" bench_train.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --batch_size 8 \
  --seq_len 512 --steps 10 --rounds 2 --warmup 2
run "sampler, Qwen2.5-0.5B shape, bf16, batch 64, prompt 128 + 256 new tokens" \
  timeout 120 "$python" bench_sampler.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --batch_sizes 64 \
  --prompt_len 128 --new_tokens 256 --repeats 2
run "GRPO, Qwen2.5-0.5B shape (demo vocabulary), bf16, 8 prompts x 8 completions of <= 128 tokens" \
  timeout 150 "$python" bench_grpo.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --steps 6 --window 3 \
  --max_completion_length 128
finish ""
