"""Orbax checkpoints in ``output_dir/checkpoint-N/``: train state plus a JSON of run metadata.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
checkpoint folder either exists whole or not at all. Saves are asynchronous; the next save
(or ``close``) waits for the previous one. Older checkpoints beyond ``save_total_limit`` are
removed only after the new one is final.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign.errors import CheckpointError

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a save in progress


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints in ``output_dir``, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "meta").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def interrupted_saves(output_dir: str | Path) -> list[Path]:
    """orbax's temporary ``checkpoint-N.orbax-checkpoint-tmp*`` folders: saves a killed run never finished."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("checkpoint-") and _TMP in p.name)


def remove_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """What a killed run left half-written in ``output_dir``, removed at the next start: unfinished
    checkpoint saves and the staging folders of an export whose process is gone. Returns what went."""
    from jaxalign.convert.hf_save import remove_stale_staging

    root = Path(output_dir)
    removed = interrupted_saves(root)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    # The exports: the model folder (staged beside it), PPO's value_model/ and LoRA's adapter files
    # (staged inside the folder as .adapter.tmp-PID).
    for dst in (root, root / "value_model", root / "adapter", root / "value_model" / "adapter"):
        removed += remove_stale_staging(dst)
    return removed


def resolve_resume(spec: str, output_dir: str | Path) -> Path:
    """'latest' -> the newest checkpoint in output_dir; otherwise the folder given."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            partial = " (only unfinished saves, removed when a run starts)" if interrupted_saves(output_dir) else ""
            raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint-N folder in {output_dir}"
                                  f"{partial}; run without --resume_from_checkpoint to start over")
        return found[-1][1]
    p = Path(spec)
    if not (p / "meta").exists() or not (p / "state").exists():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: not a jaxalign checkpoint folder (no state/ and meta/)")
    return p


class CheckpointWriter:
    """Saves train states asynchronously and prunes old checkpoints."""

    def __init__(self, output_dir: str | Path, save_total_limit: int | None):
        self.root = Path(output_dir)
        self.limit = save_total_limit
        self._ckptr = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        self._pending = False

    def save(self, step: int, state: Any, meta: dict) -> Path:
        self.wait()
        path = self.root / f"checkpoint-{step}"
        if path.exists():
            shutil.rmtree(path)
        self._ckptr.save(
            path.absolute(),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
        self._pending = True
        return path

    def wait(self) -> None:
        if self._pending:
            self._ckptr.wait_until_finished()
            self._pending = False
            self._prune()

    def _prune(self) -> None:
        if not self.limit or self.limit <= 0 or jax.process_index() != 0:
            return
        found = list_checkpoints(self.root)
        for _, p in found[: max(len(found) - self.limit, 0)]:
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        self.wait()
        self._ckptr.close()


def restore_state(path: str | Path, abstract_state: Any) -> Any:
    """Restore a train state onto the shardings of ``abstract_state`` (a tree of arrays or ShapeDtypeStructs)."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
    )
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        out = ckptr.restore(Path(path).absolute(), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match this model/optimizer ({str(e).splitlines()[0]})") from None
    return out["state"]


def write_run_files(output_dir: str | Path, tokenizer, cfg) -> None:
    """The files a run keeps beside its checkpoints: the tokenizer (for export) and args.json."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / "args.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))


def run_meta(step: int, batches, cfg, model_config, algorithm: str, **extra) -> dict:
    """A checkpoint's JSON: step, data position, options and the model config needed to export it."""
    return {
        "step": step,
        "data_state": batches.state(),
        "config": cfg.to_dict(),
        "model_config": model_config.to_hf_dict(),
        "generation_config": model_config.generation_config,
        "algorithm": algorithm,
        **extra,
    }
