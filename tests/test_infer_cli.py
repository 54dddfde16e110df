"""`jaxalign infer` end to end on a tiny model folder with a tiny character tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from helpers import make_hf_model
from jaxalign.cli import main
from jaxalign.demo.tiny_tokenizer import build_char_tokenizer

N_NEW = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A qwen3 folder whose vocabulary is the char tokenizer's, with the tokenizer saved beside it."""
    path = tmp_path_factory.mktemp("infer_model")
    tok = build_char_tokenizer()
    hf = make_hf_model("qwen3", seed=3, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path, hf, AutoTokenizer.from_pretrained(str(path))  # the tokenizer exactly as infer loads it


CONVERSATIONS = [
    [{"role": "user", "content": "what is 2+3?"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "name a color"}],
]


def reference(hf, tok, eos):
    """transformers' greedy generate, one unpadded prompt at a time."""
    out = []
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
                              pad_token_id=tok.pad_token_id, eos_token_id=eos)
        out.append((text, gen[0, ids.shape[1]:].tolist()))
    return out


def test_infer_matches_greedy_reference(model_dir, tmp_path, capsys):
    path, hf, tok = model_dir
    free = reference(hf, tok, eos=[tok.eos_token_id])
    # A stop token that row 0 emits early and row 2 never does: one "stop" row, one "length" row.
    stop = next(t for t in free[0][1][:3] if t not in free[2][1] and t != tok.eos_token_id)
    gen_cfg = json.loads((path / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [tok.eos_token_id, stop]
    (path / "generation_config.json").write_text(json.dumps(gen_cfg))
    ref = reference(hf, tok, eos=[tok.eos_token_id, stop])

    rows = [
        {"messages": CONVERSATIONS[0]},
        {"system": "be brief", "query": "hi", "response": "hello"},  # ms-swift query format, label dropped
        {"messages": CONVERSATIONS[2] + [{"role": "assistant", "content": "red"}]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dst = tmp_path / "out" / "res.jsonl"
    code = main(["infer", "--model", str(path), "--input_file", str(src), "--output_file", str(dst),
                 "--max_new_tokens", str(N_NEW), "--batch_size", "2"])
    assert code == 0
    assert "wrote 3 responses" in capsys.readouterr().out
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(got) == 3 and not list(dst.parent.glob("*.tmp-*"))
    for row, (text, ids) in zip(got, ref):
        assert set(row) == {"prompt", "response", "response_token_ids", "finish_reason"}
        assert row["prompt"] == text
        if ids[-1] in (tok.eos_token_id, stop):
            assert row["finish_reason"] == "stop"
            assert row["response"] == tok.decode(ids[:-1], skip_special_tokens=True)
        else:
            assert len(ids) == N_NEW and row["finish_reason"] == "length"
            assert row["response"] == tok.decode(ids, skip_special_tokens=True)
        assert row["response_token_ids"] == ids
    assert got[0]["finish_reason"] == "stop" and len(got[0]["response_token_ids"]) <= 3
    assert got[2]["finish_reason"] == "length"


def test_infer_prompt_to_stdout_on_a_mesh(model_dir, capsys):
    path, hf, tok = model_dir
    code = main(["infer", "--model", str(path), "--prompt", "hi", "--system", "be brief",
                 "--max_new_tokens", str(N_NEW), "--batch_size", "8", "--mesh", "fsdp=-1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    text, ids = reference(hf, tok, eos=None)[1]  # the same conversation as CONVERSATIONS[1]
    stops = json.loads((path / "generation_config.json").read_text()).get("eos_token_id") or []
    stops = set(stops if isinstance(stops, list) else [stops]) | {tok.eos_token_id}
    hit = [i for i, t in enumerate(ids) if t in stops]
    want = ids[: hit[0] + 1] if hit else ids
    assert row["prompt"] == text and row["response_token_ids"] == want


@pytest.mark.parametrize("case", ["missing_file", "bad_json", "bad_row", "no_input"])
def test_infer_bad_input_exits_2(model_dir, tmp_path, capsys, case):
    path = model_dir[0]
    src = tmp_path / "in.jsonl"
    dst = tmp_path / "out.jsonl"
    args = ["infer", "--model", str(path), "--output_file", str(dst)]
    if case == "missing_file":
        args += ["--input_file", str(tmp_path / "nope.jsonl")]
        expect = "nope.jsonl: no such file"
    elif case == "bad_json":
        src.write_text(json.dumps({"query": "hi"}) + "\n{not json\n")
        args += ["--input_file", str(src)]
        expect = "in.jsonl line 2: bad JSON"
    elif case == "bad_row":
        src.write_text(json.dumps({"text": "hi"}) + "\n")
        args += ["--input_file", str(src)]
        expect = "in.jsonl line 1:"
    else:
        expect = "--prompt TEXT or --input_file"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not dst.exists()


def test_input_file_rows_carry_their_tools(tmp_path):
    from jaxalign.commands.infer import read_prompt_rows

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="}], "tools": '[{"name": "add"}]'}) + "\n"
                    + json.dumps({"query": "2+2="}) + "\n")
    assert read_prompt_rows(str(path)) == [
        ([{"role": "user", "content": "1+1="}], f"{path} line 1", [{"name": "add"}]),
        ([{"role": "user", "content": "2+2="}], f"{path} line 2", None),
    ]
