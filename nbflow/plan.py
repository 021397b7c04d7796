"""Graph + ledger -> the plan: which steps run, which are fresh, and why.

Owns: selecting steps (`STEP ...` and what they need), deciding run or skip
from freshness, and the checks that need the plan (missing source inputs and
kernels of the steps that will run). Everything here happens before a kernel
starts. Must not execute anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from . import stores
from .errors import PipelineError, Problem, did_you_mean
from .events import PlannedStep
from .graph import Graph, lost_step_problem, resolve_parameters, secret_environment, select_steps
from .grid import folded
from .state import Ledger, assess, recorded_steps


@dataclass(frozen=True)
class Plan:
    graph: Graph
    steps: tuple[PlannedStep, ...]  # in graph order
    parameters: dict[str, dict[str, Any]]  # injected, per step
    env: dict[str, dict[str, str]]  # nbflow.yaml's env: and secrets, per step
    overrides: dict[str, Any] = field(default_factory=dict)
    forced: frozenset[str] = frozenset()  # steps that run whether fresh or not

    @property
    def to_run(self) -> list[str]:
        return [p.name for p in self.steps if p.action == "run"]


def make_plan(graph: Graph, ledger: Ledger, names: Iterable[str] = (), overrides: Mapping[str, Any] | None = None,
              *, force: bool = False, force_upstream: bool = False, only: bool = False) -> Plan:
    """Decide for each selected step whether it runs; raises PipelineError (exit 2) for what can't run.

    `names` select steps and what they need (`only`: the steps alone). `force`
    runs every selected step when no names are given or with `force_upstream`,
    else just the named ones.
    """
    names = list(names)
    problems: list[Problem] = lost_steps(graph, ledger)
    selected: list[str] = []
    parameters: dict[str, dict[str, Any]] = {}
    try:
        selected = select_steps(graph, names, only=only)
    except PipelineError as e:
        problems += e.problems
    forced: frozenset[str] = frozenset()
    if force:
        forced = frozenset(selected if force_upstream or not names else select_steps(graph, names, only=True))
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
        if name in forced:
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
    env = {name: {**graph.environment(name), **secret_environment(values)} for name, values in parameters.items()}
    plan = Plan(graph, tuple(planned), parameters, env, dict(overrides or {}), forced)
    check_runnable(plan)
    return plan


def lost_steps(graph: Graph, ledger: Ledger) -> list[Problem]:
    """Notebooks that ran as steps before but have no `parameters` cell now (a lost tag)."""
    if not graph.not_steps:
        return []
    seen = recorded_steps(ledger)
    return [lost_step_problem(nb, f"it ran as step {nb.name!r} in run {seen[nb.name]}")
            for nb in graph.not_steps if nb.name in seen]


def kernel_of(graph: Graph, name: str) -> str:
    return graph.config.for_step(name).kernel or graph.steps[name].kernel


def check_runnable(plan: Plan) -> None:
    """Source inputs exist and kernels are installed, for every step that will run."""
    graph = plan.graph
    to_run = plan.to_run
    problems = missing_inputs(graph, to_run) + missing_kernels(graph, to_run) + unmade_inputs(plan)
    if problems:
        raise PipelineError(problems)


def missing_inputs(graph: Graph, names: Iterable[str]) -> list[Problem]:
    """Source inputs of these steps that do not exist, with a did-you-mean among the paths steps write."""
    problems: list[Problem] = []
    gridded = {path for grid in graph.grids.values() for _, path in grid.step.output_paths()}
    for name in names:
        step = graph.steps[name]
        for ref in graph.source_inputs(name):
            if isinstance(ref.path, str):  # a URL: asked of its store (a store that cannot be asked says why)
                try:
                    there = stores.identity(ref.path, graph.config.storage) is not None
                except PipelineError as e:
                    problems += [replace(p, file=step.rel_path, step=step.instance_of or name) for p in e.problems
                                 if replace(p, file=step.rel_path, step=step.instance_of or name) not in problems]
                    continue
                if not there:
                    problem = Problem(f"step {step.instance_of or name!r} reads {ref.label}, which does not exist and "
                                      "no step writes it; create the object or fix the URL in `inputs`",
                                      file=step.rel_path, line=step.declaration_lines.get("inputs"),
                                      step=step.instance_of or name)
                    if problem not in problems:
                        problems.append(problem)
                continue
            if not os.path.exists(ref.path) and ref.path not in gridded:  # graph.py names the folder to read
                written = [out.label if isinstance(out.path, str) else os.path.relpath(out.path, step.folder)
                           for s in graph.steps for out in graph.outputs_of(s) if not out.label.startswith("value ")]
                reader = step.instance_of or name  # every instance reads the same: one problem
                problem = Problem(
                    f"step {reader!r} reads {ref.label}, which does not exist and no step writes it"
                    f"{did_you_mean(ref.label, written)}; create the file or fix the path in `inputs` (paths are "
                    "relative to the notebook's folder)",
                    file=step.rel_path, line=step.declaration_lines.get("inputs"), step=reader)
                if problem not in problems:
                    problems.append(problem)
    return problems


def unmade_inputs(plan: Plan) -> list[Problem]:
    """Inputs that a step outside the plan writes (`--only`) and that do not exist yet."""
    graph = plan.graph
    planned = {p.name for p in plan.steps}
    problems = []
    for name in plan.to_run:
        for up in graph.upstream[name]:
            if up in planned:
                continue
            written = {ref.path for ref in graph.outputs_of(up)}
            for ref in graph.inputs_of(name):
                if ref.path in written and not (stores.identity(ref.path, graph.config.storage) is not None
                                                if isinstance(ref.path, str) else os.path.exists(ref.path)):
                    problems.append(Problem(
                        f"step {name!r} reads {ref.label}, which step {up!r} writes, but it does not exist yet "
                        f"and --only does not run {up!r}; run without --only, or run {up!r} first",
                        file=graph.steps[name].rel_path, step=name))
    return problems


def missing_kernels(graph: Graph, names: Iterable[str]) -> list[Problem]:
    """Kernels these steps need that are not installed, each with the fixes."""
    names = list(names)
    kernels = {kernel_of(graph, n) for n in names}
    if not kernels or kernels == {"python3"} and _native_kernel_installed():
        return []
    from .kernels import installed_kernels  # noqa: PLC0415 - only when something runs

    installed = installed_kernels()
    problems = []
    for kernel in sorted(kernels - set(installed)):
        users = [n for n in names if kernel_of(graph, n) == kernel]
        other = "python3" if "python3" in installed else (installed[0] if installed else "python3")
        problems.append(Problem(
            f"kernel {kernel!r} is not installed (needed by {', '.join(folded(users))}); installed kernels: "
            f"{', '.join(installed) or 'none'}; run the steps on an installed kernel with the line "
            f"`defaults: {{kernel: {other}}}` in nbflow.yaml, or install {kernel!r} (e.g. `python -m ipykernel "
            f"install --user --name {kernel}`)", file=graph.steps[users[0]].rel_path, step=users[0]))
    return problems


def _native_kernel_installed() -> bool:
    """Whether `python3` is installed, known without importing jupyter_client (0.1-0.3 s of a `status`): its
    KernelSpecManager always offers `python3`, the native kernel, where ipykernel can be imported."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("ipykernel") is not None
