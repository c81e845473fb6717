"""Declarative absorption, the planning and running half (the spec is read
by workbench.pipeline): `make_plan` says what each step will do (reuse a
finished job found by its fingerprint, or run, with an estimate) and writes
nothing; `apply_plan` runs it through the workbench's own actions, up to the
gated promotion; `export_spec` writes the spec of a finished absorb;
`optimize` searches settings to meet a spec's objectives. It sits
in serving because its last step moves an alias."""

from serving.pipeline.export import absorb_of, export_spec
from serving.pipeline.plan import Plan, PlanError, Step, make_plan
from serving.pipeline.run import Outcome, apply_plan
from serving.pipeline.search import Search, optimize

__all__ = [
    "Outcome",
    "Plan",
    "PlanError",
    "Search",
    "Step",
    "absorb_of",
    "apply_plan",
    "export_spec",
    "make_plan",
    "optimize",
]
