"""FLOPs of a compiled program with its loops at their trip counts, read from the optimized HLO text.

XLA's ``cost_analysis()`` counts a ``while`` loop's body once, whatever its trip count. jaxalign's
programs loop over the decoder's layers (``lax.scan``) and the gradient-accumulation micro-batches,
so its figure would be about one layer's worth. This module counts the FLOPs of every computation as
XLA does for the operations that carry nearly all of a transformer's (matmuls: ``dot``, ``convolution``;
arithmetic elementwise operations and reductions: one per element), multiplying a loop body by the
loop's trip count: XLA's ``known_trip_count`` annotation (CPU, GPU) or the bound of its condition
``i < N`` (TPU); a loop with neither, such as the sampler's early-stopping decode loop, counts once. The corrected count is XLA's total plus the extra iterations of every loop body.
"""

from __future__ import annotations

import math
import re

import numpy as np

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z]+\d*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z]+\d*\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LHS_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=[^_]*_([0-9a-z]+)->")


# Operations XLA's cost analysis counts as one FLOP per output element (transcendentals are counted apart).
_ELEMENTWISE = frozenset((
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "compare", "select", "and", "or",
    "not", "xor", "abs", "sign", "clamp", "power", "remainder", "floor", "ceil", "round-nearest-afz",
    "round-nearest-even", "convert", "is-finite", "shift-left", "shift-right-logical", "shift-right-arithmetic",
    "popcnt", "count-leading-zeros",
))


def _window(rest: str) -> dict[str, list]:
    m = re.search(r"window=\{([^}]*)\}", rest)
    out: dict[str, list] = {}
    for item in (m.group(1).split() if m else []):
        key, _, value = item.partition("=")
        parts = value.split("x")
        out[key] = [tuple(int(v) for v in q.split("_")) if key == "pad" else int(q) for q in parts]
    return out


def _convolution_flops(lhs, rhs, out, rest: str) -> int:
    """XLA's count for a convolution (TPU expresses many matmuls as ones): 2 x batch x output features x input
    features per group x, per spatial dimension, the (output, kernel) position pairs that read a real
    (not padding, not dilation) input element."""
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", rest)
    if not labels:
        return 2 * math.prod(out)
    lhs_l, rhs_l, out_l = labels.groups()
    groups = re.search(r"feature_group_count=(\d+)", rest)
    batch_groups = re.search(r"batch_group_count=(\d+)", rest)
    w = _window(rest)
    fma = (lhs[lhs_l.index("f")] // (int(groups.group(1)) if groups else 1)) * rhs[rhs_l.index("o")]
    fma *= lhs[lhs_l.index("b")] // (int(batch_groups.group(1)) if batch_groups else 1)
    for d in sorted(c for c in lhs_l if c.isdigit()):
        k = int(d)
        size_in, size_out, size_k = lhs[lhs_l.index(d)], out[out_l.index(d)], rhs[rhs_l.index(d)]
        stride = w.get("stride", [1] * (k + 1))[k] if len(w.get("stride", [])) > k else 1
        pad_lo = w["pad"][k][0] if len(w.get("pad", [])) > k else 0
        base = w["lhs_dilate"][k] if len(w.get("lhs_dilate", [])) > k else 1
        wdil = w["rhs_dilate"][k] if len(w.get("rhs_dilate", [])) > k else 1
        o = np.arange(size_out)[None, :] * stride - pad_lo + np.arange(size_k)[:, None] * wdil
        valid = (o >= 0) & (o % base == 0) & (o // base < size_in)
        fma *= int(valid.sum())
    return 2 * fma


def _dims(text: str) -> tuple[int, ...] | None:
    m = _ARRAY.match(text.strip())
    if not m:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d)


def _ints(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _parse(hlo: str) -> tuple[dict[str, list], str | None, dict[str, int]]:
    """(computations: name -> [("flops", n) | ("call", callee, 1 or ("while", attributes))], the entry's name,
    loop conditions' bounds: name -> N for a condition ``i < N``)."""
    comps: dict[str, list] = {}
    bounds: dict[str, int] = {}
    entry = current_name = None
    shapes: dict[str, tuple[int, ...]] = {}
    constants: dict[str, int] = {}
    current: list | None = None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current_name = header.group(1)
            current = comps.setdefault(current_name, [])
            if line.lstrip().startswith("ENTRY"):
                entry = current_name
            shapes = {p: tuple(_ints(d)) for p, _, d in _PARAM.findall(header.group(2))}
            constants = {}
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        out = _dims(shape)
        if out is not None:
            shapes[name] = out
        if op in ("dot", "convolution") and out is not None:
            args = rest.split(")", 1)[0]
            inline = re.findall(r"[a-z]+\d*\[[0-9,]*\]", args)  # operand shapes when the text prints them
            names = _OPERAND.findall(args)
            operand_shapes = [tuple(_ints(s[s.index("[") + 1:-1])) for s in inline] or [shapes.get(n) for n in names]
            if len(operand_shapes) >= 2 and all(s is not None for s in operand_shapes[:2]):
                lhs, rhs = operand_shapes[0], operand_shapes[1]
                if op == "dot":
                    cm = _LHS_CONTRACT.search(rest)
                    contract = math.prod(lhs[i] for i in _ints(cm.group(1))) if cm else 1
                    current.append(("flops", 2 * math.prod(out) * contract))
                else:
                    current.append(("flops", _convolution_flops(lhs, rhs, out, rest)))
        elif op in _ELEMENTWISE and out is not None:
            current.append(("flops", math.prod(out)))
        elif op == "reduce" and out is not None:
            names = _OPERAND.findall(rest.split(")", 1)[0])
            inline = re.findall(r"[a-z]+\d*\[[0-9,]*\]", rest.split(")", 1)[0])
            src = tuple(_ints(inline[0][inline[0].index("[") + 1:-1])) if inline else shapes.get(names[0]) if names else None
            if src is not None:
                current.append(("flops", math.prod(src)))
        callees = _CALLS.findall(rest)
        for b in _BRANCHES.findall(rest):
            callees += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
        if op == "constant" and re.fullmatch(r"s(?:32|64)\[\]", shape.split("{")[0]):
            value = re.match(r"\s*(-?\d+)\)", rest)
            if value:
                constants[name] = int(value.group(1))
        if op == "compare" and line.lstrip().startswith("ROOT"):
            args = _OPERAND.findall(rest.split(")", 1)[0])
            direction = re.search(r"direction=(\w+)", rest)
            if len(args) == 2 and direction and direction.group(1) == "LT" and args[1] in constants:
                bounds[current_name] = constants[args[1]]  # `i < N` with i from 0: JAX's scans and fori_loops
        if callees:
            body = re.search(r"\bbody=%?([\w.\-]+)", rest)
            for c in callees:
                current.append(("call", c, ("while", rest) if (op == "while" and body and c == body.group(1)) else 1))
    return comps, entry, bounds


def _trips(rest: str, bounds: dict[str, int]) -> int:
    """A while loop's trip count: XLA's ``known_trip_count`` (CPU, GPU), else the bound its condition compares
    the induction variable against (TPU's loops carry no annotation); 1 when neither is known."""
    trip = _TRIP.search(rest)
    if trip:
        return int(trip.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
    return bounds.get(cond.group(1), 1) if cond else 1


def loop_flops(hlo: str) -> tuple[float, float]:
    """(FLOPs with each loop body counted once, as XLA's cost analysis does; with loop bodies at their known
    trip counts) of an optimized HLO module's text."""
    comps, entry, bounds = _parse(hlo)
    memo: dict[tuple[str, bool], float] = {}

    def total(name: str, trips: bool, depth: int = 0) -> float:
        key = (name, trips)
        if key in memo:
            return memo[key]
        if depth > 200 or name not in comps:
            return 0.0
        memo[key] = 0.0  # guards against a (malformed) cycle
        s = 0.0
        for item in comps[name]:
            if item[0] == "flops":
                s += item[1]
            else:
                n = _trips(item[2][1], bounds) if isinstance(item[2], tuple) else 1
                s += total(item[1], trips, depth + 1) * (n if trips else 1)
        memo[key] = s
        return s

    if entry is None:
        return 0.0, 0.0
    return total(entry, False), total(entry, True)
