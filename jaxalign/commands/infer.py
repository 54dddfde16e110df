"""`jaxalign infer`: generate responses for a prompt or a JSONL file of ms-swift rows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

NAME = "infer"
HELP = "generate responses with the pure-JAX sampler (a prompt or a JSONL file of ms-swift rows)"
DESCRIPTION = (
    HELP + ". Each result is one JSON line {prompt, response, response_token_ids, finish_reason}, streamed to "
    "--output_file (written under a temporary name, renamed when complete) or to stdout. Sampling settings not "
    "given on the command line come from the model's generation_config.json when it sets do_sample=true; "
    "otherwise decoding is greedy (temperature 0), as `swift infer` does with an unset temperature."
)


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=DESCRIPTION)
    p.add_argument("--model",
                   help="a Hugging Face model folder (config.json, *.safetensors, tokenizer files) or a jaxalign "
                        "checkpoint folder (output_dir/checkpoint-N; its tokenizer is output_dir/tokenizer); with "
                        "--adapters the base (default: the adapter config's base_model_name_or_path)")
    p.add_argument("--adapters", help="a LoRA adapter folder (PEFT format) to run on the model")
    p.add_argument("--prompt", help="one user message to answer")
    p.add_argument("--system", help="system message placed before --prompt")
    p.add_argument("--input_file", help="JSONL rows in ms-swift format ('messages', or 'query' [+ 'system', "
                                        "'history']); a final assistant turn is dropped")
    p.add_argument("--output_file", help="JSONL destination (default: print the rows to stdout)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="response budget in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: generation_config.json's when it sets do_sample, else 0")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=None, help="Hugging Face's rule (1.0 = off)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    p.add_argument("--template", choices=("default", "plain", "gemma"), default="default",
                   help="chat template: the tokenizer's own (default; Gemma's turns for a Gemma model whose "
                        "tokenizer has none), a plain 'role: text' fallback, or Gemma's turns")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--attn_impl", choices=("auto", "xla", "chunked", "cudnn", "splash"), default="auto",
                   help="attention implementation (default auto: by platform and length; see the README)")
    p.add_argument("--mesh", default=None,
                   help="device mesh such as 'data=1,fsdp=-1,tensor=1' (default: one device); "
                        "--batch_size must be a multiple of data*fsdp")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxalign.errors import ConfigError

    if (args.prompt is None) == (args.input_file is None):
        raise ConfigError("pass exactly one of --prompt TEXT or --input_file FILE.jsonl")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        conversations = [(messages + [{"role": "user", "content": args.prompt}], "--prompt", None)]
    else:
        conversations = read_prompt_rows(args.input_file)
    if not conversations:
        raise ConfigError(f"{args.input_file}: no rows; give at least one JSON line")

    import jax

    from jaxalign.convert.checkpoint_io import load_any_model
    from jaxalign.data.template import ChatRenderer
    from jaxalign.data.tokenizer import load_tokenizer, stop_token_ids
    from jaxalign.models.attention import check_impl
    from jaxalign.models.decoder import set_attn_impl
    from jaxalign.parallel import make_mesh, mesh_platform
    from jaxalign.rollout import generate

    mesh = make_mesh(args.mesh) if args.mesh else None
    base = args.model
    if args.adapters:
        from jaxalign.convert.peft_io import apply_adapter, read_adapter_config

        base = base or read_adapter_config(args.adapters)[1]
    if not base:
        raise ConfigError("--model is required: a Hugging Face model folder (or --adapters whose config names its base)")
    tokenizer = load_tokenizer(args.adapters if args.adapters and _has_tokenizer(args.adapters) else base,
                               training=False)
    model = load_any_model(base, dtype=args.dtype, mesh=mesh)
    set_attn_impl(model, check_impl(args.attn_impl, mesh_platform(mesh)))
    if args.adapters:
        apply_adapter(model, args.adapters)
    config = model.config
    sampling = sampling_settings(args, config.generation_config or {})
    _check_sampling(sampling)
    stops = list(stop_token_ids(tokenizer, config))
    pad_id = next(x for x in (tokenizer.pad_token_id, config.pad_token_id, 0) if x is not None)
    renderer = ChatRenderer(tokenizer, None if args.template == "default" else args.template,
                            model_type=config.model_type)
    encoded = []
    for messages, where, tools in conversations:
        text = renderer.render(messages, add_generation_prompt=True, where=where, tools=tools)
        ids = renderer.encode_text(text)
        if not ids:
            raise ConfigError(f"{where}: the prompt renders to no tokens")
        encoded.append((text, ids))

    key = jax.random.key(args.seed)
    writer = _Writer(args.output_file)
    try:
        for start in range(0, len(encoded), args.batch_size):
            chunk = encoded[start:start + args.batch_size]
            ids, mask = padded_prompts([c[1] for c in chunk], args.batch_size, pad_id)
            out = generate(
                model, ids, mask, max_new_tokens=args.max_new_tokens, stop_token_ids=stops,
                rng=jax.random.fold_in(key, start), pad_token_id=pad_id, mesh=mesh, **sampling,
            )
            tokens, lengths, finished = jax.device_get((out.tokens, out.lengths, out.finished))
            for i, (text, _) in enumerate(chunk):
                resp = [int(t) for t in tokens[i, : lengths[i]]]
                shown = resp[:-1] if finished[i] else resp
                writer.write({
                    "prompt": text,
                    "response": tokenizer.decode(shown, skip_special_tokens=True),
                    "response_token_ids": resp,
                    "finish_reason": "stop" if finished[i] else "length",
                })
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if args.output_file:
        print(f"wrote {len(encoded)} responses to {args.output_file}")
    return 0


def _has_tokenizer(folder: str) -> bool:
    from pathlib import Path

    return (Path(folder) / "tokenizer_config.json").is_file()


def read_prompt_rows(path: str) -> list[tuple[list[dict[str, Any]], str, list | None]]:
    """(messages, "file line N", tools) for each row of an ms-swift JSONL file; a final assistant turn is dropped."""
    from jaxalign.data.formats import BadRow, normalize_row
    from jaxalign.data.rows import Row
    from jaxalign.errors import DataError

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; check --input_file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: bad JSON ({e.msg} at column {e.colno}); fix the line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            row = Row(obj, path, lineno, is_jsonl=True)
            try:
                example = normalize_row(row, "prompt", name="infer")
            except BadRow as e:
                raise DataError(f"{row.where}: {e}; fix the row") from None
            out.append((example.messages, row.where, example.tools))
    return out


def sampling_settings(args: argparse.Namespace, gen: dict[str, Any]) -> dict[str, Any]:
    """Command-line values, else generation_config.json's when it samples, else greedy."""
    samples = bool(gen.get("do_sample"))

    def pick(name, fallback_sampling, off):
        value = getattr(args, name)
        if value is not None:
            return value
        if samples and gen.get(name) is not None:
            return gen[name]
        return fallback_sampling if samples else off

    rep = args.repetition_penalty if args.repetition_penalty is not None else gen.get("repetition_penalty") or 1.0
    return dict(
        temperature=float(pick("temperature", 1.0, 0.0)),
        top_k=int(pick("top_k", 50, 0) or 0),
        top_p=float(pick("top_p", 1.0, 1.0)),
        repetition_penalty=float(rep),
    )


def _check_sampling(s: dict[str, Any]) -> None:
    from jaxalign.errors import ConfigError

    if s["temperature"] < 0:
        raise ConfigError(f"--temperature {s['temperature']}: must be >= 0 (0 = greedy)")
    if s["top_k"] < 0:
        raise ConfigError(f"--top_k {s['top_k']}: must be >= 0 (0 = off)")
    if not 0 < s["top_p"] <= 1:
        raise ConfigError(f"--top_p {s['top_p']}: must be in (0, 1]")
    if s["repetition_penalty"] <= 0:
        raise ConfigError(f"--repetition_penalty {s['repetition_penalty']}: must be > 0 (1 = off)")


def padded_prompts(seqs: list[list[int]], batch_size: int, pad_id: int):
    """Left-padded ids and mask [batch_size, bucket]; the bucket is the next power of two (>= 16) of the
    longest prompt, and missing rows repeat the first prompt (their results are dropped)."""
    from jaxalign.data.collate import left_pad

    bucket = max(16, 1 << (max(len(s) for s in seqs) - 1).bit_length())
    return left_pad(list(seqs) + [seqs[0]] * (batch_size - len(seqs)), bucket, pad_id)


class _Writer:
    """JSON lines to stdout, or to ``path`` through a temporary file renamed on close."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = f"{path}.tmp-{os.getpid()}"
            self.f = open(self.tmp, "w", encoding="utf-8")
        else:
            self.f = sys.stdout

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.path:
            self.f.close()
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.path:
            self.f.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
