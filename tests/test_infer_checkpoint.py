"""`jaxalign infer` on a jaxalign checkpoint equals infer on the Hugging Face export of the same weights."""

import json

from helpers import TINY, make_base, short_rows, write_jsonl

from jaxalign import cli


def _flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        out += [f"--{k}", str(v)]
    return out


def test_infer_reads_checkpoints(tmp_path, capsys):
    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", short_rows(16))
    out = tmp_path / "run"
    opts = {**TINY, "save_steps": 2}
    assert cli.main(["sft", "--model", base, "--dataset", data, "--output_dir", str(out), "--max_steps", "2",
                     *_flags({k: v for k, v in opts.items()})]) == 0
    capsys.readouterr()
    results = []
    for model in (out / "checkpoint-2", out):  # the checkpoint, then the final export of the same weights
        dst = tmp_path / f"answers-{len(results)}.jsonl"
        assert cli.main(["infer", "--model", str(model), "--prompt", "12+7=", "--max_new_tokens", "6",
                         "--output_file", str(dst)]) == 0
        results.append(json.loads(dst.read_text().splitlines()[0]))
    assert results[0]["response_token_ids"] == results[1]["response_token_ids"]
    assert results[0]["response"] == results[1]["response"]
    assert len(results[0]["response_token_ids"]) >= 1
