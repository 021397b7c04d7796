"""Graph + ledger -> the plan: which steps run, which are fresh, and why.

Owns: selecting steps (`STEP ...` and what they need), deciding run or skip
from freshness, and the checks that need the plan (missing source inputs and
kernels of the steps that will run). Everything here happens before a kernel
starts. Must not execute anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import PipelineError, Problem
from .events import PlannedStep
from .graph import Graph, resolve_parameters, secret_environment, select_steps
from .state import Ledger, assess


@dataclass(frozen=True)
class Plan:
    graph: Graph
    steps: tuple[PlannedStep, ...]  # in graph order
    parameters: dict[str, dict[str, Any]]  # injected, per step
    env: dict[str, dict[str, str]]  # secrets, per step
    overrides: dict[str, Any] = field(default_factory=dict)
    force: bool = False

    @property
    def to_run(self) -> list[str]:
        return [p.name for p in self.steps if p.action == "run"]


def make_plan(graph: Graph, ledger: Ledger, names: Iterable[str] = (), overrides: Mapping[str, Any] | None = None,
              *, force: bool = False) -> Plan:
    """Decide for each selected step whether it runs; raises PipelineError (exit 2) for what can't run."""
    problems: list[Problem] = []
    selected: list[str] = []
    parameters: dict[str, dict[str, Any]] = {}
    try:
        selected = select_steps(graph, names)
    except PipelineError as e:
        problems += e.problems
    try:
        parameters = resolve_parameters(graph, overrides)
    except PipelineError as e:
        problems += e.problems
    if problems:
        # still report what could not run (missing inputs, kernels), as if every selected step ran
        provisional = Plan(graph, tuple(PlannedStep(n, "run", ()) for n in selected or graph.order), {}, {})
        try:
            check_runnable(provisional)
        except PipelineError as e:
            problems += e.problems
        raise PipelineError(problems)
    planned: list[PlannedStep] = []
    rerunning: set[str] = set()
    for name in selected:
        if force:
            planned.append(PlannedStep(name, "run", ("forced (--force)",)))
            rerunning.add(name)
            continue
        ups = tuple(u for u in graph.upstream[name] if u in rerunning)
        fresh = assess(graph, name, parameters[name], ledger, ups, kernel=kernel_of(graph, name))
        if fresh.fresh:
            planned.append(PlannedStep(name, "skip", ("fresh",)))
        else:
            planned.append(PlannedStep(name, "run", fresh.reasons))
            rerunning.add(name)
    env = {name: secret_environment(values) for name, values in parameters.items()}
    plan = Plan(graph, tuple(planned), parameters, env, dict(overrides or {}), force)
    check_runnable(plan)
    return plan


def kernel_of(graph: Graph, name: str) -> str:
    return graph.config.for_step(name).kernel or graph.steps[name].kernel


def check_runnable(plan: Plan) -> None:
    """Source inputs exist and kernels are installed, for every step that will run."""
    graph = plan.graph
    problems: list[Problem] = []
    to_run = plan.to_run
    for name in to_run:
        for ref in graph.source_inputs(name):
            if not os.path.exists(ref.path):
                problems.append(Problem(
                    f"step {name!r} reads {ref.label}, which does not exist and no step writes it; "
                    "create the file or fix the path in `inputs` (paths are relative to the notebook's folder)",
                    file=graph.steps[name].rel_path, line=graph.steps[name].declaration_lines.get("inputs"),
                    step=name))
    kernels = {kernel_of(graph, n) for n in to_run}
    if kernels:
        from .kernels import installed_kernels  # noqa: PLC0415 - only when something runs

        installed = installed_kernels()
        for kernel in sorted(kernels - set(installed)):
            users = [n for n in to_run if kernel_of(graph, n) == kernel]
            problems.append(Problem(
                f"kernel {kernel!r} is not installed (needed by {', '.join(users)}); installed kernels: "
                f"{', '.join(installed) or 'none'}; install it (e.g. `python -m ipykernel install --user "
                f"--name {kernel}`) or change the notebook's kernel", file=graph.steps[users[0]].rel_path))
    if problems:
        raise PipelineError(problems)
