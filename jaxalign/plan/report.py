"""Compile a plan's programs and report per-device memory, FLOPs and time bounds (text or JSON)."""

from __future__ import annotations

import re
import time

from jaxalign.plan.build import Plan, Program
from jaxalign.plan.hlo_flops import loop_flops
from jaxalign.plan.topology import CHIP_SOURCE, GIB, Topology

_REFUSED = re.compile(r"temporaries \((\d+(?:\.\d+)?)([KMGT])\) exceeds? available HBM \((\d+(?:\.\d+)?)([KMGT])\)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _size(value: str, unit: str) -> int:
    return int(float(value) * _UNITS[unit])


def compile_program(program: Program, topo: Topology) -> dict:
    """Compile ``program`` and read XLA's per-device memory and cost analyses.

    ``total`` is XLA's: arguments + outputs - aliased (donated inputs reused as outputs) + temporaries;
    ``peak`` adds what stays on the chips during the program without being its argument."""
    rec: dict = {"program": program.name, "notes": list(program.notes),
                 "lower_seconds": round(program.lower_seconds, 2),
                 "argument_parts": dict(program.parts), "resident_elsewhere": dict(program.resident_elsewhere)}
    hbm = topo.device_hbm
    rec["hbm"] = None if hbm is None else int(hbm)
    t0 = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA refusing a program that does not fit is a result, not a crash
        msg = " ".join(str(e).split())
        if not re.search(r"HBM|RESOURCE_EXHAUSTED|out of memory", msg, re.I):
            raise
        rec.update(compile_seconds=round(time.perf_counter() - t0, 2), fits=False, error=msg[:500])
        m = _REFUSED.search(msg)  # libtpu: "HLO temporaries (34.77G) exceeds available HBM (15.75G)"
        if m:
            temp, avail = _size(m.group(1), m.group(2)), _size(m.group(3), m.group(4))
            args = sum(program.parts.values())  # XLA's own figure is not reported: from the shapes
            need = temp + args + sum(program.resident_elsewhere.values())
            rec.update(temporaries=temp, arguments=args, available_hbm=avail, peak=need, headroom=avail - need)
        return rec
    rec["compile_seconds"] = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    total = args + out - alias + temp
    elsewhere = sum(program.resident_elsewhere.values())
    rec.update(arguments=args, outputs=out, aliased=alias, temporaries=temp, total=total, peak=total + elsewhere,
               generated_code=int(mem.generated_code_size_in_bytes))
    if hbm is not None:
        rec["fits"] = rec["peak"] <= hbm
        rec["headroom"] = int(hbm - rec["peak"])
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    xla_flops = float((cost or {}).get("flops", 0.0))
    once, looped = loop_flops(compiled.as_text())  # XLA counts each loop body once (the layer scan!)
    flops = xla_flops - once + looped
    rec["flops_xla_loop_bodies_once"] = xla_flops
    n = len(topo.devices)
    rec.update(flops=flops, flops_all_devices=flops * n, model_flops=program.model_flops)
    peak = topo.device_peak
    if peak:
        if program.name == "sampler":  # XLA's count has one decode step; the model count has them all
            rec["time_lower_bound_s"] = program.model_flops / (peak * n)
        else:
            rec["time_lower_bound_s"] = flops / peak
            if flops:
                rec["mfu_at_bound"] = program.model_flops / (flops * n)
    return rec


def run_plan(plan: Plan, topo: Topology) -> dict:
    """Compile every program of ``plan``; the whole report as a JSON-ready dict."""
    cfg = plan.cfg
    report = {
        "topology": topo.name, "platform": topo.platform, "chips": topo.chips, "devices": len(topo.devices),
        "rlhf_type": plan.algorithm.name, "tuner_type": cfg.tuner_type, "torch_dtype": cfg.torch_dtype,
        "gradient_checkpointing": bool(cfg.gradient_checkpointing), "model": str(cfg.model),
        "model_type": plan.config.model_type, **plan.facts,
        "chip": None if topo.peak_flops is None else {
            "peak_bf16_flops": topo.peak_flops, "hbm_bytes": topo.hbm_bytes, "source": CHIP_SOURCE},
        "programs": [compile_program(p, topo) for p in plan.programs],
    }
    fits = [p.get("fits") for p in report["programs"]]
    report["fits"] = None if any(f is None for f in fits) else all(fits)
    return report


def _unit(p: dict) -> tuple[str, int]:
    """GiB, or MiB/KiB for a small program, so its figures are not all 0.00."""
    largest = p.get("peak", 0) if "peak" in p else (p.get("hbm") or 0)
    for name, scale in (("GiB", GIB), ("MiB", 1024**2)):
        if largest >= scale:
            return name, scale
    return "KiB", 1024


def _eng(v: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} "


def format_report(r: dict) -> str:
    """The report as a short table per program (GiB per device)."""
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    per = "chip" if r["platform"] == "tpu" and r["chips"] == r["devices"] else "device"
    lines = [
        f"jaxalign plan: {r['rlhf_type']} ({r['tuner_type']}) on {r['topology']}: {r['devices']} devices, mesh {mesh}",
        f"model: {r['model_type']}, {r['layers']} layers, {r['trainable_params']:,} trainable + "
        f"{r['frozen_params']:,} frozen params; {r['torch_dtype']} compute, gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'}",
    ]
    for p in r["programs"]:
        unit, scale = _unit(p)

        def _g(v: float) -> str:
            return f"{v / scale:8.2f}"

        lines.append("")
        lines.append(f"{p['program']} ({unit} per {per})")
        for note in p["notes"]:
            lines.append(f"  {note}")
        if "error" in p:
            lines.append(f"  does NOT fit: the compiler refused it: {p['error']}")
            if "available_hbm" in p:
                lines.append(f"  needs >= {p['peak'] / GIB:.2f} GiB per {per}: temporaries {p['temporaries'] / GIB:.2f} "
                             f"+ arguments {p['arguments'] / GIB:.2f} (from the shapes); "
                             f"{p['available_hbm'] / GIB:.2f} GiB available, {-p['headroom'] / GIB:.2f} GiB over")
            continue
        parts = ", ".join(f"{k} {v / scale:.2f}" for k, v in p["argument_parts"].items() if v)
        lines += [
            f"  arguments    {_g(p['arguments'])}   ({parts})",
            f"  outputs      {_g(p['outputs'])}",
            f"  aliased      {_g(-p['aliased'])}   (donated inputs reused for outputs)",
            f"  temporaries  {_g(p['temporaries'])}",
            f"  total        {_g(p['total'])}   (arguments + outputs - aliased + temporaries, XLA)",
        ]
        if p["resident_elsewhere"]:
            what = ", ".join(f"{k} {v / scale:.2f}" for k, v in p["resident_elsewhere"].items())
            lines.append(f"  + resident  {_g(sum(p['resident_elsewhere'].values()))}   ({what}; not arguments)")
            lines.append(f"  peak        {_g(p['peak'])}")
        if p.get("hbm"):
            verdict = "fits" if p["fits"] else "does NOT fit"
            amount = f"{abs(p['headroom']) / scale:.2f} {unit} {'free' if p['fits'] else 'over'}"
            lines.append(f"  HBM          {_g(p['hbm'])}   -> {verdict}, {amount}")
        lines.append(f"  FLOPs        {_eng(p['flops'])}FLOP per {per} (XLA cost analysis, loops at their trip "
                     f"counts); model FLOPs {_eng(p['model_flops'])}FLOP over all {per}s")
        if "time_lower_bound_s" in p:
            bound = f"  time        >= {p['time_lower_bound_s']:.4g} s at the {per}'s peak bf16 FLOP/s"
            bound += " (a lower bound: no communication, memory or launch time)"
            lines.append(bound)
            if "mfu_at_bound" in p:
                lines.append(f"  MFU          {100 * p['mfu_at_bound']:.1f}% at that bound (model / compiled FLOPs; "
                             "an upper bound on the run's MFU)")
        lines.append(f"  compiled in {p['compile_seconds']:.1f} s (lowered in {p['lower_seconds']:.1f} s)")
    if r["chip"]:
        c = r["chip"]
        lines.append("")
        lines.append(f"chip: {c['peak_bf16_flops'] / 1e12:.0f} TFLOP/s peak bf16, {c['hbm_bytes'] / GIB:.0f} GiB HBM "
                     f"(from {c['source']})")
    if r["fits"] is not None:
        lines.append(f"verdict: {'fits' if r['fits'] else 'does NOT fit'} on {r['topology']}")
    return "\n".join(lines)
