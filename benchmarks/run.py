"""nbflow's benchmark: nbflow against papermill (in-process loop and CLI) and Ploomber, in one run.

    python benchmarks/run.py                      # full run (10-30 minutes)
    python benchmarks/run.py --quick              # fewer runs, ~2-4 minutes
    python benchmarks/run.py --smoke              # tiny workloads: checks that it works, times nothing
    python benchmarks/run.py --python benchmarks/.cache/lab-venv/bin/python   # another environment

Owns: generating the workloads (benchmarks/workloads.py), timing every tool as
a subprocess of the interpreter given with --python (so an environment other
than the one running this script can be measured), the import checks
(`python -X importtime`), the ratios against the targets of issue 5, and the
table. Stdlib only. Timings are medians; they are noisy on a shared machine,
so nothing here is ever a test assertion.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402

CACHE = HERE / ".cache"
PROBE = HERE / "probe.py"
FORBIDDEN = ("papermill", "pandas", "nbformat", "jsonschema")
ALSO_WATCHED = ("nbclient", "jupyter_client", "zmq", "pyarrow", "rich", "yaml", "rfc3987_syntax")
DF_ROWS = 10_000


@dataclass
class Sizes:
    chain: int = 10
    independent: int = 8
    jobs: int = 2
    cells: int = 400
    dag: int = 200
    runs: int = 5  # fast tools
    slow_runs: int = 3  # papermill CLI, ploomber build
    chain_samples: int = 20  # nbflow forced chain runs for p99/p50
    boots: int = 5  # kernel boots for the CPU floor
    parquet_samples: int = 5  # fresh processes writing / reading the frame alone
    dag_run: bool = True  # run the 200-step pipeline once, then time `status` on it all fresh
    ploomber: bool = True
    papermill_cli: bool = True
    loop_runs: int = 5  # papermill loop (in-process), interleaved with the first nbflow runs
    warmups: bool = True  # one untimed run of each tool before the timed ones
    engine_calls: int = 10  # papermill.execute_notebook calls per engine (default, nbflow), in one process
    grid: tuple[int, int] = (8, 6)  # a x b instances of the gridded step (48), plus a fan-in
    grid_status: tuple[int, int] = (2000, 500)  # instances: `nbflow status` never run / after a full run
    noop: int = 300  # steps of the pipeline whose all-fresh `nbflow run` is timed
    watch_saves: int = 20  # notebook saves timed, from the save to the first cell of the stale step


def sizes_for(mode: str) -> Sizes:
    if mode == "quick":
        return Sizes(runs=3, slow_runs=1, chain_samples=5, boots=3, parquet_samples=3, dag_run=False,
                     papermill_cli=False, loop_runs=2, warmups=False, watch_saves=10)
    if mode == "smoke":
        return Sizes(chain=2, independent=2, cells=5, dag=6, runs=1, slow_runs=1, chain_samples=2, boots=1,
                     parquet_samples=1, dag_run=True, ploomber=False, papermill_cli=False, loop_runs=1, warmups=False,
                     engine_calls=2, grid=(2, 2), grid_status=(40, 6), noop=6, watch_saves=2)
    return Sizes()


@dataclass
class Row:
    """One line of the table: what was measured, against what, and the target."""

    workload: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Bench:
    python: str
    work: Path
    sizes: Sizes
    log: Path
    rows: list[Row] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    # -- running things ---------------------------------------------------------------
    @property
    def bindir(self) -> Path:
        return Path(self.python).parent  # not resolved: a venv's bin/python is a symlink

    def nbflow_cmd(self) -> list[str]:
        script = self.bindir / "nbflow"
        return [str(script)] if script.exists() else [self.python, "-m", "nbflow.cli"]

    def call(self, cmd: list[str], cwd: Path | None = None, env: dict | None = None,
             ok_codes: tuple[int, ...] = (0,)) -> tuple[float, str, float]:
        """Run cmd; return (wall seconds, stdout, CPU seconds of it and its waited-for descendants)."""
        env = measured_env(env)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(self.log, "a") as err:
            err.write(f"\n$ {' '.join(cmd)}  (cwd {cwd})\n")
            err.flush()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode not in ok_codes:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; see {self.log}\n{proc.stdout[-2000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, proc.stdout, cpu

    def probe(self, *args: str) -> dict:
        _, out, _ = self.call([self.python, str(PROBE), *args])
        return json.loads(out.strip().splitlines()[-1])

    def nbflow(self, *args: str, cwd: Path | None = None) -> tuple[float, dict | str, float]:
        wall, out, cpu = self.call([*self.nbflow_cmd(), *args], cwd=cwd or self.work)
        if "--json" in args:
            return wall, json.loads(out), cpu
        return wall, out, cpu

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)

    # -- the workloads ---------------------------------------------------------------
    def chain_forced(self, ploomber: str | None, ploomber_problem: str | None) -> None:
        s = self.sizes
        chain = self.work / "chain"
        workloads.chain(chain, s.chain)
        pm_out = self.work / "pm-out"
        nb_times: list[float] = []
        nb_cpu: list[float] = []
        loop, loop_inner, cli, pl = [], [], [], []
        first_step, later_steps = [], []  # duration_s of the first step, and of every other step, of each run
        pl_dir = self.work / "ploomber-chain"
        if ploomber:
            workloads.ploomber_chain(pl_dir, s.chain)
        if s.warmups:  # page cache, bytecode, the ledger's creation
            self.nbflow("run", "chain", "--force", "--json")
            self.call([self.python, str(PROBE), "papermill-loop", str(chain), str(pm_out)])
        for r in range(max(s.runs, s.chain_samples)):
            wall, result, cpu = self.nbflow("run", "chain", "--force", "--json")
            assert isinstance(result, dict) and result["status"] == "succeeded", result
            nb_times.append(wall)
            nb_cpu.append(cpu)
            durations = [step["duration_s"] for step in result["steps"]]
            first_step.append(durations[0])
            later_steps += durations[1:]
            if r < s.loop_runs:
                wall, out, _ = self.call([self.python, str(PROBE), "papermill-loop", str(chain), str(pm_out)])
                loop.append(wall)
                loop_inner.append(json.loads(out.strip().splitlines()[-1])["loop_s"])
            if r < s.slow_runs and s.papermill_cli:
                t0 = time.perf_counter()
                for nb in sorted(chain.glob("*.ipynb")):
                    self.call([str(self.bindir / "papermill"), str(nb), str(pm_out / nb.name), "--cwd", str(chain)])
                cli.append(time.perf_counter() - t0)
            if r < s.slow_runs and ploomber:
                env = {**os.environ, "PLOOMBER_STATS_ENABLED": "false", "PLOOMBER_VERSION_CHECK_DISABLED": "true"}
                wall, _, _ = self.call([ploomber, "build", "--force"], cwd=pl_dir, env=env)
                pl.append(wall)
        self.raw["chain_forced"] = {"nbflow": nb_times, "nbflow_cpu": nb_cpu, "papermill_loop": loop,
                                    "papermill_loop_inner": loop_inner, "papermill_cli": cli, "ploomber": pl,
                                    "first_step": first_step, "later_steps": later_steps}
        nbm = statistics.median(nb_times[: max(s.runs, s.loop_runs)])
        n = f"{s.chain}-step chain, forced"
        lm = statistics.median(loop)
        self.add(Row(n, f"{nbm:.2f} s", f"papermill loop {lm:.2f} s", nbm / lm, "<= 0.30", nbm / lm <= 0.30,
                     f"whole processes; loop alone {statistics.median(loop_inner):.2f} s + import/startup"))
        if pl:
            pm = statistics.median(pl)
            version = self.call([str(Path(ploomber).parent / "python"), "-c",
                                 "import ploomber; print(ploomber.__version__)"])[1].strip()
            self.add(Row(n, f"{nbm:.2f} s", f"ploomber build {pm:.2f} s", nbm / pm, "<= 0.20", nbm / pm <= 0.20,
                         f"Ploomber {version} in its own venv; median of {len(pl)}"))
        else:
            self.add(Row(n, f"{nbm:.2f} s", "ploomber build: not measured", None, "<= 0.20", None,
                         ploomber_problem or "disabled"))
        if cli:
            cm = statistics.median(cli)
            self.add(Row(n, f"{nbm:.2f} s", f"papermill CLI {cm:.2f} s", nbm / cm, "(info)", None,
                         f"one `papermill` process per step; median of {len(cli)}"))
        everyone = statistics.median(nb_times)
        steps = statistics.median(later_steps) if later_steps else 0.0
        self.add(Row(f"{n}: `nbflow run --force`", f"{everyone:.2f} s", f"papermill loop {lm:.2f} s", everyone / lm,
                     "<= 0.6 s", everyone <= 0.6,
                     f"whole process, median of {len(nb_times)}; a step after the first: median "
                     f"{steps * 1000:.0f} ms (p90 {percentile(later_steps, 90) * 1000:.0f} ms, from --json), the "
                     f"first (it waits for the fork server's boot) {statistics.median(first_step) * 1000:.0f} ms"))
        p50, p99 = percentile(nb_times, 50), percentile(nb_times, 99)
        c50, c99 = percentile(nb_cpu, 50), percentile(nb_cpu, 99)
        self.add(Row(f"{s.chain}-step chain p99/p50 ({len(nb_times)} runs)", f"p50 {p50:.2f} s, p99 {p99:.2f} s",
                     "", p99 / p50, "<= 1.5", p99 / p50 <= 1.5,
                     f"wall clock; CPU of nbflow and its kernels: p50 {c50:.2f} s, p99 {c99:.2f} s, "
                     f"p99/p50 {c99 / c50:.2f}"))

    def noop_many(self) -> None:
        """`nbflow run` of a large pipeline where every step is fresh: what watch mode does on every save."""
        s = self.sizes
        folder = self.work / "noop"
        workloads.dag(folder, s.noop)
        wall, result, _ = self.nbflow("run", "noop", "--json", "-j", str(s.jobs))
        assert isinstance(result, dict) and result["status"] == "succeeded", result
        runs, statuses = [], []
        for _ in range(max(s.runs, 5)):
            runs.append(self.nbflow("run", "noop", "--json"))
            statuses.append(self.nbflow("status", "noop"))
            done = runs[-1][1]
            assert isinstance(done, dict) and {st["status"] for st in done["steps"]} == {"skipped"}, done
        times = [t for t, _, _ in runs]
        self.raw["noop"] = {"run": times, "run_cpu": [c for _, _, c in runs], "status": [t for t, _, _ in statuses],
                            "first_run": wall}
        m = statistics.median(times)
        self.add(Row(f"{s.noop}-step pipeline, all fresh: `nbflow run`", f"{m:.2f} s",
                     f"`nbflow status` {statistics.median(t for t, _, _ in statuses):.2f} s", None, "<= 0.5 s",
                     m <= 0.5, f"every step skipped; CPU {statistics.median(c for _, _, c in runs):.2f} s; whole "
                               f"process, median of {len(times)}"))

    def watch_latency(self) -> None:
        """`nbflow run --watch`: from a notebook save to the first cell of the stale step executing, N saves."""
        s = self.sizes
        folder = self.work / "watch"
        edited = workloads.watch_chain(folder, 3)
        stamp = folder / workloads.WATCH_STAMP
        proc = subprocess.Popen([*self.nbflow_cmd(), "run", str(folder), "--watch"], cwd=self.work,
                                stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True, env=measured_env())
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()

        def cycles_done() -> int:
            return sum(1 for line in list(lines) if line.startswith(tuple("0123456789")) and " cycle " in line
                       and ": changed " not in line and ": running what is stale" not in line)

        latencies: list[float] = []
        try:
            wait_for(lambda: cycles_done() >= 1, 120, "the watch's first cycle", lines)
            time.sleep(0.5)  # the warm kernel is ready again
            for i in range(s.watch_saves):
                before = cycles_done()
                saved_at = time.time()
                workloads.touch_watch_notebook(edited, i)  # as Jupyter saves: the file rewritten in place
                wait_for(lambda: _stamp_after(stamp, saved_at), 60, f"save {i + 1}'s step", lines)
                latencies.append(float(stamp.read_text()) - saved_at)
                wait_for(lambda: cycles_done() > before, 60, f"save {i + 1}'s cycle", lines)
                time.sleep(0.3)  # one save per cycle, as a person saves
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.raw["watch"] = {"save_to_first_cell": latencies}
        m = statistics.median(latencies)
        self.add(Row(f"watch: notebook save -> first cell of the stale step", f"{m * 1000:.0f} ms", "", None,
                     "< 0.5 s", m < 0.5, f"median of {len(latencies)} saves (p90 {percentile(latencies, 90) * 1000:.0f}"
                                         f" ms, max {max(latencies) * 1000:.0f} ms); `nbflow run --watch`, the "
                                         f"middle step of 3 edited; exit code {proc.returncode} after Ctrl-C"))

    def chain_fresh(self) -> None:
        """Everything fresh: nothing may run, no kernel may start, no notebook may be written."""
        chain = self.work / "chain"
        runs_dir = chain / "_nbflow" / "runs"
        times, cpus = [], []
        for _ in range(self.sizes.runs):
            before = {p for p in runs_dir.rglob("*.ipynb")}
            wall, result, cpu = self.nbflow("run", "chain", "--json")
            cpus.append(cpu)
            assert isinstance(result, dict)
            statuses = {st["status"] for st in result["steps"]}
            written = {p for p in runs_dir.rglob("*.ipynb")} - before
            if statuses != {"skipped"} or written:
                raise RuntimeError(f"all-fresh run did work: statuses {statuses}, notebooks written {written}")
            times.append(wall)
        self.raw["chain_fresh"] = times
        m = statistics.median(times)
        self.add(Row(f"{self.sizes.chain}-step chain, all fresh: `nbflow run`", f"{m:.3f} s", "", None, "<= 0.3 s",
                     m <= 0.3, f"every step skipped, no notebook written (no kernel started); CPU "
                               f"{statistics.median(cpus) * 1000:.0f} ms"))

    def independent(self) -> None:
        s = self.sizes
        folder = self.work / "independent"
        workloads.independent(folder, s.independent)
        boots = self.probe("kernel-boot-cpu", str(s.boots))
        boot_cpu = statistics.median(boots["cpu_s"])
        floor = s.independent * boot_cpu / s.jobs
        times, cpus = [], []
        if s.warmups:
            self.nbflow("run", "independent", "--force", "--json", "-j", str(s.jobs))
        for _ in range(s.runs):
            wall, result, cpu = self.nbflow("run", "independent", "--force", "--json", "-j", str(s.jobs))
            assert isinstance(result, dict) and result["status"] == "succeeded", result
            times.append(wall)
            cpus.append(cpu)
        self.raw["independent"] = {"nbflow": times, "nbflow_cpu": cpus, "boot": boots}
        m = statistics.median(times)
        self.add(Row(f"{s.independent} independent steps, -j {s.jobs}", f"{m:.2f} s",
                     f"CPU floor {floor:.2f} s ({s.independent} x {boot_cpu:.2f} s / {s.jobs})", m / floor,
                     "<= 1.4", m / floor <= 1.4,
                     f"floor: CPU of ordinary kernel boots; nbflow's own CPU {statistics.median(cpus):.2f} s"))

    def many_cells(self) -> None:
        s = self.sizes
        folder = self.work / "cells"
        nb = workloads.many_cells(folder, s.cells)
        out = self.work / "nbclient-out.ipynb"
        mine, plain, plain_exec = [], [], []
        if s.warmups:
            self.nbflow("run", "cells", "--force", "--json")
        for _ in range(s.runs):
            wall, result, _ = self.nbflow("run", "cells", "--force", "--json")
            assert isinstance(result, dict) and result["status"] == "succeeded", result
            mine.append(wall)
            wall, outp, _ = self.call([self.python, str(PROBE), "nbclient", str(nb), str(out)])
            plain.append(wall)
            plain_exec.append(json.loads(outp.strip().splitlines()[-1])["execute_s"])
        self.raw["many_cells"] = {"nbflow": mine, "nbclient": plain, "nbclient_execute": plain_exec}
        m, p = statistics.median(mine), statistics.median(plain)
        self.add(Row(f"one notebook of {s.cells} cells", f"{m:.2f} s", f"plain nbclient {p:.2f} s", m / p, "<= 1.3",
                     m / p <= 1.3, f"whole processes; nbclient execute() alone {statistics.median(plain_exec):.2f} s"))

    def grid_sweep(self, ploomber: str | None, ploomber_problem: str | None) -> None:
        """A 48-instance grid and its fan-in, -j 2: nbflow vs a papermill loop vs Ploomber's grid, interleaved."""
        s = self.sizes
        a, b = s.grid
        n = a * b
        folder, pl_dir, out = self.work / "grid", self.work / "ploomber-grid", self.work / "grid-pm-out"
        workloads.grid(folder, a, b)
        if ploomber:
            workloads.ploomber_grid(pl_dir, a, b, s.jobs)
        env = {**os.environ, "PLOOMBER_STATS_ENABLED": "false", "PLOOMBER_VERSION_CHECK_DISABLED": "true"}
        if s.warmups:
            self.nbflow("run", "grid", "--force", "--json", "-j", str(s.jobs))
        mine, cpus, loop, loop_inner, pl = [], [], [], [], []
        retries = 0  # papermill kernels that died before replying to kernel_info, started again
        for r in range(max(s.runs, s.loop_runs)):
            if r < s.runs:
                wall, result, cpu = self.nbflow("run", "grid", "--force", "--json", "-j", str(s.jobs))
                assert isinstance(result, dict) and result["status"] == "succeeded", result
                assert len(result["steps"]) == n + 1, result
                mine.append(wall)
                cpus.append(cpu)
            if r < s.loop_runs:
                wall, found, _ = self.call([self.python, str(PROBE), "papermill-grid", str(folder), str(out), str(a),
                                            str(b)])
                loop.append(wall)
                loop_inner.append(json.loads(found.strip().splitlines()[-1])["loop_s"])
                retries += json.loads(found.strip().splitlines()[-1])["kernel_start_retries"]
            if r < s.slow_runs and ploomber:
                pl.append(self.call([ploomber, "build", "--force"], cwd=pl_dir, env=env)[0])
        self.raw["grid"] = {"nbflow": mine, "nbflow_cpu": cpus, "papermill_loop": loop,
                            "papermill_loop_inner": loop_inner, "ploomber": pl}
        m, lm = statistics.median(mine), statistics.median(loop)
        name = f"{n}-instance grid + fan-in, -j {s.jobs}, forced"
        self.add(Row(name, f"{m:.2f} s", f"papermill loop {lm:.2f} s", m / lm, "<= 0.25", m / lm <= 0.25,
                     f"whole processes; loop alone {statistics.median(loop_inner):.2f} s; nbflow CPU "
                     f"{statistics.median(cpus):.2f} s" + (f"; {retries} papermill kernel start(s) retried" if retries
                                                          else "")))
        if pl:
            pm = statistics.median(pl)
            version = self.call([str(Path(ploomber).parent / "python"), "-c",
                                 "import ploomber; print(ploomber.__version__)"])[1].strip()
            self.add(Row(name, f"{m:.2f} s", f"ploomber build (grid) {pm:.2f} s", m / pm, "(info)", None,
                         f"Ploomber {version}: its grid and its Parallel executor with {s.jobs} processes; "
                         f"median of {len(pl)}"))
        else:
            self.add(Row(name, f"{m:.2f} s", "ploomber build (grid): not measured", None, "(info)", None,
                         ploomber_problem or "disabled"))

    def grid_status(self) -> None:
        """`nbflow status` of a large grid: never run, and after a full run (hashing and the ledger included)."""
        s = self.sizes
        for n, run_first in zip(s.grid_status, (False, True)):
            label = f"grid{n}"
            workloads.grid(self.work / label, *((n // 10, 10) if n % 10 == 0 else (n, 1)))  # 2,000 = 200 x 10
            note = "planning, freshness and left-behind outputs; no kernel"
            if run_first:
                wall, result, _ = self.nbflow("run", label, "--json", "-j", str(s.jobs))
                assert isinstance(result, dict) and result["status"] == "succeeded", result
                note += f"; after one run of all {n} instances and the fan-in ({wall:.1f} s with -j {s.jobs})"
            samples = [self.nbflow("status", label) for _ in range(s.runs)]
            if run_first:
                out = self.nbflow("status", label, "--json")[1]
                assert isinstance(out, dict) and {st["state"] for st in out["steps"]} == {"fresh"}, out
            times = [t for t, _, _ in samples]
            self.raw[f"grid_status_{'fresh' if run_first else 'never_run'}"] = times
            m = statistics.median(times)
            self.add(Row(f"{n}-instance grid: `nbflow status`, {'all fresh' if run_first else 'never run'}",
                         f"{m:.2f} s", "", None, "<= 0.5 s", m <= 0.5,
                         f"{note}; CPU {statistics.median(c for _, _, c in samples):.2f} s"))

    def papermill_engine(self) -> None:
        """nbflow as a papermill engine: a loop of execute_notebook calls, default engine vs engine_name="nbflow"."""
        s = self.sizes
        nb = workloads.papermill_notebook(self.work / "engine")
        found = self.probe("papermill-engines", str(nb), str(self.work / "engine-out"), str(s.engine_calls))
        self.raw["papermill_engine"] = found
        mine, theirs = sum(found["nbflow"]), sum(found["default"])
        self.add(Row(f"{s.engine_calls} papermill.execute_notebook calls, engine nbflow", f"{mine:.2f} s",
                     f"default engine {theirs:.2f} s", mine / theirs, "<= 0.30", mine / theirs <= 0.30,
                     f"one process, calls interleaved; per call: nbflow first {found['nbflow'][0]:.2f} s (fork "
                     f"server boot), then median {statistics.median(found['nbflow'][1:] or found['nbflow']):.2f} s; "
                     f"default median {statistics.median(found['default']):.2f} s"))

    def dataframe(self) -> None:
        """The hand-over's CPU cost inside the two kernels, beyond what parquet write + read cost alone."""
        s = self.sizes
        folder = self.work / "dataframe"
        workloads.dataframe_handover(folder, DF_ROWS)
        glue, load, trivial, walls = [], [], [], []
        for i in range(s.runs + s.warmups):
            _, result, _ = self.nbflow("run", "dataframe", "--force", "--json")
            assert isinstance(result, dict) and result["status"] == "succeeded", result
            if i < s.warmups:
                continue
            produce = json.loads((folder / "timings-produce.json").read_text())
            consume = json.loads((folder / "timings-consume.json").read_text())
            glue.append(produce["glue"])
            load.append(consume["load"])
            trivial.append(produce["trivial"] + consume["trivial"])
            nbs = {st["name"]: json.loads((folder / st["notebook"]).read_text()) for st in result["steps"]}
            walls.append(cell_duration(nbs["produce"], lambda c: "nbflow.glue" in c)
                         + cell_duration(nbs["consume"], lambda c: "load_value" in c))
        write, read, write_wall, read_wall = [], [], [], []
        path = self.work / "frame.parquet"
        for _ in range(s.parquet_samples):
            w = self.probe("parquet-write", str(path), str(DF_ROWS))
            r = self.probe("parquet-read", str(path))
            write.append(w["write_cpu_s"])
            read.append(r["read_cpu_s"])
            write_wall.append(w["write_s"])
            read_wall.append(r["read_s"])
        parquet = statistics.median(write) + statistics.median(read)
        handover = statistics.median(glue) + statistics.median(load) - statistics.median(trivial)
        overhead = handover - parquet
        wall_over = (statistics.median(walls) - statistics.median(write_wall) - statistics.median(read_wall))
        self.raw["dataframe"] = {"glue_cpu": glue, "load_cpu": load, "two_trivial_cells_cpu": trivial,
                                 "glue_plus_load_cells_wall": walls, "parquet_write_cpu": write,
                                 "parquet_read_cpu": read, "parquet_write_wall": write_wall,
                                 "parquet_read_wall": read_wall}
        self.add(Row(f"DataFrame hand-over ({DF_ROWS:,} rows)", f"overhead {overhead * 1000:.0f} ms CPU",
                     f"parquet write+read alone {parquet * 1000:.0f} ms CPU", None, "<= 10 ms", overhead <= 0.010,
                     f"glue {statistics.median(glue) * 1000:.0f} ms + load {statistics.median(load) * 1000:.0f} ms "
                     f"- 2 trivial cells {statistics.median(trivial) * 1000:.0f} ms, CPU in the kernels; wall: cells "
                     f"{statistics.median(walls) * 1000:.0f} ms vs parquet alone "
                     f"{(statistics.median(write_wall) + statistics.median(read_wall)) * 1000:.0f} ms "
                     f"({wall_over * 1000:+.0f} ms, includes 2 cell round trips)"))

    def status_many(self) -> None:
        s = self.sizes
        folder = self.work / "dag"
        workloads.dag(folder, s.dag)
        samples = [self.nbflow("status", "dag") for _ in range(s.runs)]
        times = [t for t, _, _ in samples]
        self.raw["status_never_run"] = times
        m = statistics.median(times)
        self.add(Row(f"{s.dag}-step pipeline: `nbflow status`, never run", f"{m:.2f} s", "", None, "<= 1 s", m <= 1.0,
                     f"planning and status only, no kernel; CPU {statistics.median(c for _, _, c in samples):.2f} s"))
        if not s.dag_run:
            return
        wall, result, _ = self.nbflow("run", "dag", "--json", "-j", str(s.jobs))
        assert isinstance(result, dict) and result["status"] == "succeeded", result
        self.raw["dag_run"] = wall
        samples = [self.nbflow("status", "dag") for _ in range(s.runs)]
        times = [t for t, _, _ in samples]
        out = self.nbflow("status", "dag", "--json")[1]
        assert isinstance(out, dict) and {st["state"] for st in out["steps"]} == {"fresh"}, out
        self.raw["status_fresh"] = times
        m = statistics.median(times)
        self.add(Row(f"{s.dag}-step pipeline: `nbflow status`, all fresh", f"{m:.2f} s", "", None, "<= 1 s",
                     m <= 1.0, f"after one run of all {s.dag} steps ({wall:.1f} s with -j {s.jobs}); CPU "
                               f"{statistics.median(c for _, _, c in samples):.2f} s"))

    def startup(self) -> None:
        runs = max(self.sizes.runs, 5)
        help_samples = [self.call([*self.nbflow_cmd(), "--help"]) for _ in range(runs)]
        helps = [t for t, _, _ in help_samples]
        bare = [self.call([self.python, "-c", "pass"])[0] for _ in range(runs)]
        imp = [self.call([self.python, "-c", "import nbflow"])[0] for _ in range(runs)]
        self.raw["startup"] = {"help": helps, "python_bare": bare, "import_nbflow": imp}
        h = statistics.median(helps)
        self.add(Row("`nbflow --help`", f"{h * 1000:.0f} ms", f"bare python {statistics.median(bare) * 1000:.0f} ms",
                     None, "<= 150 ms", h <= 0.150,
                     f"CPU {statistics.median(c for _, _, c in help_samples) * 1000:.0f} ms"))
        cumulative = importtime(self, ["-c", "import nbflow"])["cumulative_us"].get("nbflow", 0) / 1e6
        self.add(Row("`import nbflow`", f"{cumulative * 1000:.1f} ms (importtime)",
                     f"process {statistics.median(imp) * 1000:.0f} ms vs bare {statistics.median(bare) * 1000:.0f} ms",
                     None, "(no heavy imports)", None))

    def imports(self) -> None:
        """Which heavy modules each command imports in nbflow's own process (`python -X importtime`)."""
        cli = "import sys; from nbflow.cli import main; sys.argv = ['nbflow'] + sys.argv[1:]; main()"
        checks = [
            ("import nbflow", ["-c", "import nbflow"], True),
            ("nbflow --help", ["-c", cli, "--help"], True),
            ("nbflow status", ["-c", cli, "status", "chain"], True),
            ("nbflow run (all fresh)", ["-c", cli, "run", "chain", "--json"], True),
            ("nbflow run --force (driver)", ["-c", cli, "run", "chain", "--force", "--json"], False),
            ("import nbclient", ["-c", "import nbclient"], False),
        ]
        found = {}
        for label, args, must_be_clean in checks:
            info = importtime(self, args)
            heavy = {m: info["cumulative_us"][m] / 1e6 for m in FORBIDDEN + ALSO_WATCHED if m in info["cumulative_us"]}
            bad = [m for m in FORBIDDEN if m in heavy]
            found[label] = heavy
            if must_be_clean:
                self.add(Row(f"imports: {label}", ", ".join(bad) or "none of " + "/".join(FORBIDDEN),
                             "", None, "none", not bad, describe_imports(heavy)))
            else:
                self.add(Row(f"imports: {label}", describe_imports(heavy) or "nothing heavy", "", None,
                             "no jsonschema" if label.startswith("nbflow") else "(info)",
                             ("jsonschema" not in heavy) if label.startswith("nbflow") else None))
        self.raw["imports"] = found


def _stamp_after(stamp: Path, saved_at: float) -> bool:
    try:
        return float(stamp.read_text()) > saved_at
    except (OSError, ValueError):
        return False


def wait_for(condition, timeout: float, what: str, lines: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; the watch printed:\n{''.join(lines[-20:])}")
        time.sleep(0.005)


def measured_env(env: dict | None = None) -> dict:
    """The environment of measured commands: as a user has it, with bytecode caching on.

    (Sandboxes often set PYTHONDONTWRITEBYTECODE; then an editable nbflow is
    recompiled from source by every command, which no user's machine does.)
    """
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_nbflow(bench: Bench) -> None:
    """Write nbflow's bytecode once, as its first import on a user's machine does."""
    where = bench.call([bench.python, "-c", "import nbflow, os; print(os.path.dirname(nbflow.__file__))"])[1].strip()
    bench.call([bench.python, "-m", "compileall", "-q", where])


_LOADED = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('MODULES ' + ' '.join(sorted("
           "{m.split('.')[0] for m in sys.modules})) + chr(10)))\n")


def importtime(bench: Bench, args: list[str]) -> dict:
    """Run `python -X importtime -c CODE ...` in the work folder.

    Returns the top-level packages loaded at exit, with the cumulative import
    time of each (a failed optional import also prints a line, so the modules
    loaded at exit decide what was imported).
    """
    assert args[0] == "-c"
    cmd = [bench.python, "-X", "importtime", "-c", _LOADED + args[1], *args[2:]]
    proc = subprocess.run(cmd, cwd=bench.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=measured_env(), check=False)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    cumulative: dict[str, int] = {}
    loaded: set[str] = set()
    for line in proc.stderr.splitlines():
        if line.startswith("MODULES "):
            loaded = set(line.split()[1:])
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| *(\S+)$", line)
        if m and m.group(2) == m.group(2).split(".")[0]:
            # a package's own line (imported once, before its submodules) carries its whole cost
            cumulative[m.group(2)] = cumulative.get(m.group(2), 0) + int(m.group(1))
    return {"cumulative_us": {name: cumulative.get(name, 0) for name in loaded}}


def describe_imports(heavy: dict[str, float]) -> str:
    return ", ".join(f"{m} {t * 1000:.0f} ms" for m, t in sorted(heavy.items(), key=lambda kv: -kv[1]))


def cell_duration(nb: dict, match) -> float:
    for cell in nb["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and match(source.strip()):
            return float(cell["metadata"]["papermill"]["duration"])
    raise LookupError("no such cell in the executed notebook")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ensure_ploomber(log: Path) -> tuple[str | None, str | None]:
    """Ploomber in its own venv under benchmarks/.cache (pip install ploomber); (its CLI, None) or (None, why not)."""
    venv = CACHE / "ploomber-venv"
    exe = venv / "bin" / "ploomber"
    if exe.exists():
        return str(exe), None
    try:
        with open(log, "a") as err:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=err, stderr=err)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "ploomber"], check=True,
                           stdout=err, stderr=err, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return None, f"ploomber could not be installed ({e}); see {log}"
    return (str(exe), None) if exe.exists() else (None, "ploomber installed no `ploomber` command")


def machine_facts(bench: Bench) -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": model, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "loadavg_start": os.getloadavg(), **bench.probe("versions")}


def format_row(row: Row) -> str:
    ratio = f"{row.ratio:.2f}" if row.ratio is not None else ""
    met = {True: "met", False: "MISSED", None: ""}[row.met]
    line = f"{row.workload:<46} {row.value:<26} {row.baseline:<36} {ratio:>6}  {row.target:<12} {met}"
    return line.rstrip() + (f"\n{'':<46} {row.note}" if row.note else "")


def markdown(bench: Bench, facts: dict) -> str:
    p = facts["packages"]
    out = [f"Environment: `{bench.python}` — Python {facts['python']}, papermill {p['papermill']}, nbclient "
           f"{p['nbclient']}, nbformat {p['nbformat']}, ipykernel {p['ipykernel']}, jupyter_client "
           f"{p['jupyter_client']}, jsonschema {p['jsonschema']}, jupyterlab {p['jupyterlab'] or 'not installed'}; "
           f"{facts['nproc']} CPUs ({facts['cpu']}); {facts['date']}; load average at start "
           f"{facts['loadavg_start'][0]:.1f}, at end {facts['loadavg_end'][0]:.1f}.", "",
           "| workload | nbflow | baseline | ratio | target | result | notes |", "|---|---|---|---|---|---|---|"]
    for r in bench.rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        met = {True: "met", False: "**missed**", None: ""}[r.met]
        out.append(f"| {r.workload} | {r.value} | {r.baseline} | {ratio} | {r.target} | {met} | {r.note} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter (of a venv with nbflow and papermill) whose tools are measured")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="fewer runs (~2 minutes)")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="tiny workloads, one run each: checks that the benchmark works, times nothing useful")
    parser.add_argument("--no-ploomber", action="store_true", help="do not install or run Ploomber")
    parser.add_argument("--only", help="comma-separated subset: chain,fresh,noop,watch,independent,cells,engine,grid,"
                                       "dataframe,"
                                       "status,startup,imports")
    parser.add_argument("--work", type=Path, help="where workloads are generated [benchmarks/.cache/work-<env>]")
    parser.add_argument("--json", type=Path, help="write the rows, raw timings and machine facts here")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown here")
    args = parser.parse_args(argv)
    sizes = sizes_for(args.mode or "full")
    if args.no_ploomber:
        sizes.ploomber = False
    python = os.path.abspath(args.python) if os.sep in args.python else shutil.which(args.python) or args.python
    label = Path(python).parent.parent.name or "python"
    work = args.work or CACHE / f"work-{label}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "benchmark.log"
    bench = Bench(python, work, sizes, log)
    facts = machine_facts(bench)
    compile_nbflow(bench)
    print(f"nbflow benchmark ({args.mode or 'full'}) with {python}: Python {facts['python']}, {facts['nproc']} CPUs "
          f"({facts['cpu']}), load average {facts['loadavg_start'][0]:.1f}; log {log}", flush=True)
    selected = set((args.only or "chain,fresh,noop,watch,independent,cells,engine,grid,dataframe,status,startup,"
                                 "imports").split(","))
    ploomber, problem = (None, "disabled (--no-ploomber)")
    if ("chain" in selected or "grid" in selected) and sizes.ploomber:
        ploomber, problem = ensure_ploomber(log)
        if problem:
            print(f"ploomber: {problem}", flush=True)
    if "chain" in selected:
        bench.chain_forced(ploomber, problem)
    if "fresh" in selected:
        if not (work / "chain" / "_nbflow").exists():
            workloads.chain(work / "chain", sizes.chain)
            bench.nbflow("run", "chain", "--json")
        bench.chain_fresh()
    if "noop" in selected:
        bench.noop_many()
    if "watch" in selected:
        bench.watch_latency()
    if "independent" in selected:
        bench.independent()
    if "cells" in selected:
        bench.many_cells()
    if "engine" in selected:
        bench.papermill_engine()
    if "grid" in selected:
        bench.grid_sweep(ploomber, problem)
        bench.grid_status()
    if "dataframe" in selected:
        bench.dataframe()
    if "status" in selected:
        bench.status_many()
    if "startup" in selected:
        bench.startup()
    if "imports" in selected:
        if not (work / "chain" / "_nbflow").exists():
            workloads.chain(work / "chain", sizes.chain)
            bench.nbflow("run", "chain", "--json")  # the all-fresh check needs a fresh pipeline
        bench.imports()
    facts["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "sizes": sizes.__dict__, "mode": args.mode or "full",
                                         "rows": [r.__dict__ for r in bench.rows], "raw": bench.raw}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(bench, facts))
    missed = [r.workload for r in bench.rows if r.met is False]
    print(f"\n{len(bench.rows) - len(missed)} rows met or informational, {len(missed)} missed"
          f"{': ' + '; '.join(missed) if missed else ''}; load average at end {facts['loadavg_end'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
