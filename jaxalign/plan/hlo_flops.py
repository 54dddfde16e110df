"""FLOPs of a compiled program with its loops at their trip counts, read from the optimized HLO text.

XLA's ``cost_analysis()`` counts a ``while`` loop's body once, whatever its trip count. jaxalign's
programs loop over the decoder's layers (``lax.scan``) and the gradient-accumulation micro-batches,
so its figure would be about one layer's worth. This module counts the FLOPs of every computation as
XLA does for the operations that carry nearly all of a transformer's (matmuls: ``dot``, ``convolution``;
arithmetic elementwise operations and reductions: one per element), multiplying a loop body by the
loop's ``known_trip_count`` (a loop without one, such as the sampler's early-stopping decode loop,
counts once). The corrected count is XLA's total plus the extra iterations of every loop body.
"""

from __future__ import annotations

import math
import re

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
    "round-nearest-even",
))


def _dims(text: str) -> tuple[int, ...] | None:
    m = _ARRAY.match(text.strip())
    if not m:
        return None
    return tuple(int(d) for d in m.group(1).split(",") if d)


def _ints(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _parse(hlo: str) -> tuple[dict[str, list], str | None]:
    """Computations: name -> [(kind, data)]: ("flops", n) for a matmul, ("call", [names], trips) for a callee."""
    comps: dict[str, list] = {}
    entry = None
    shapes: dict[str, tuple[int, ...]] = {}
    current: list | None = None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(1)
            current = comps.setdefault(name, [])
            if line.lstrip().startswith("ENTRY"):
                entry = name
            shapes = {p: tuple(_ints(d)) for p, _, d in _PARAM.findall(header.group(2))}
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
                else:  # kernel elements per output feature
                    lm = _DIM_LABELS.search(rest)
                    o = lm.group(1).index("o") if lm and "o" in lm.group(1) else len(rhs) - 1
                    contract = math.prod(rhs) // max(rhs[o], 1)
                current.append(("flops", 2 * math.prod(out) * contract))
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
        if callees:
            trip = _TRIP.search(rest)
            body = re.search(r"\bbody=%?([\w.\-]+)", rest)
            trips = int(trip.group(1)) if (op == "while" and trip) else 1
            for c in callees:
                current.append(("call", c, trips if (body and c == body.group(1)) else 1))
    return comps, entry


def loop_flops(hlo: str) -> tuple[float, float]:
    """(FLOPs with each loop body counted once, as XLA's cost analysis does; with loop bodies at their known
    trip counts) of an optimized HLO module's text."""
    comps, entry = _parse(hlo)
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
                s += total(item[1], trips, depth + 1) * (item[2] if trips else 1)
        memo[key] = s
        return s

    if entry is None:
        return 0.0, 0.0
    return total(entry, False), total(entry, True)
