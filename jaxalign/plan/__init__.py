"""`jaxalign plan`: a run's per-device memory, FLOPs and time bounds, compiled ahead of time for a topology
from shapes alone (no weights, no data, no accelerator)."""

from jaxalign.plan.build import build_plan
from jaxalign.plan.report import format_report, run_plan

__all__ = ["build_plan", "format_report", "run_plan"]
