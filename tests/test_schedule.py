"""`nbflow schedule`: the crontab line, the next run times, bad expressions, and --install through `crontab`."""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import stat
import sys
from pathlib import Path

from click.testing import CliRunner

from nbflow.cli import main


def schedule(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["schedule", *args], env=env)


def test_prints_the_crontab_line_and_the_next_three_runs(fixture_pipeline):
    root = fixture_pipeline("diamond")
    result = schedule(str(root), "--cron", "0 6 * * *")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    nbflow = Path(sys.executable).parent / "nbflow"
    path = shlex.quote(os.environ["PATH"])  # cron's bare PATH would not find what the notebooks call
    assert lines[0] == (f"0 6 * * * cd {root.parent} && PATH={path} NBFLOW_TRIGGER=schedule {nbflow} run {root} >> "
                        f"{root}/_nbflow/cron.log 2>&1 # nbflow schedule {root}")
    assert (root / "_nbflow").is_dir()  # where cron's first run appends its log
    assert lines[1] == "next runs:"
    times = [dt.datetime.strptime(line.split()[0] + " " + line.split()[1], "%Y-%m-%d %H:%M") for line in lines[2:5]]
    assert all(t.hour == 6 and t.minute == 0 for t in times)
    assert [b - a for a, b in zip(times, times[1:])] == [dt.timedelta(days=1)] * 2
    now = dt.datetime.now()
    assert now < times[0] <= now + dt.timedelta(days=1)


def test_the_schedule_of_nbflow_yaml_is_used_without_cron(fixture_pipeline):
    root = fixture_pipeline("diamond")
    (root / "nbflow.yaml").write_text('schedule: "30 */2 * * 1-5"\n')
    result = schedule(str(root))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("30 */2 * * 1-5 cd ")
    for line in result.output.splitlines()[2:5]:
        when = dt.datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M")
        assert when.minute == 30 and when.hour % 2 == 0 and when.weekday() < 5


def test_a_bad_expression_exits_2_with_the_reason(fixture_pipeline):
    root = fixture_pipeline("diamond")
    for expression, reason in (("61 * * * *", "out of range"), ("0 6 * *", "exactly 5 fields, this has 4"),
                               ("0 0 * * * *", "exactly 5 fields, this has 6"), ("0 6 31 2 *", "never fires")):
        result = schedule(str(root), "--cron", expression)
        assert result.exit_code == 2, (expression, result.output)
        assert f"Invalid value for '--cron': {expression!r}" in result.output and reason in result.output, \
            result.output
        assert '"0 6 * * *"' in result.output  # an example of what works
    (root / "nbflow.yaml").write_text("jobs: 2\n")
    missing = schedule(str(root))
    assert missing.exit_code == 2 and "--cron" in missing.output and "nbflow.yaml" in missing.output


def fake_crontab(folder: Path, existing: str | None) -> Path:
    """A `crontab` that keeps the table in a file: `-l` prints it, `-` replaces it."""
    table = folder / "table"
    if existing is not None:
        table.write_text(existing)
    script = folder / "crontab"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-l" ]; then
  if [ -f {table} ]; then cat {table}; else echo "no crontab for $USER" >&2; exit 1; fi
elif [ "$1" = "-" ]; then cat > {table}
else exit 64; fi
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return table


def test_install_adds_the_line_once_and_keeps_the_other_lines(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    table = fake_crontab(bin_dir, "MAILTO=me@example.org\n15 * * * * backup.sh\n")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    first = schedule(str(root), "--cron", "0 6 * * *", "--install", env=env)
    assert first.exit_code == 0, first.output
    assert "installed in your crontab" in first.output
    again = schedule(str(root), "--cron", "0 7 * * *", "--install", env=env)  # replaces, never duplicates
    assert again.exit_code == 0, again.output
    lines = table.read_text().splitlines()
    assert lines[:2] == ["MAILTO=me@example.org", "15 * * * * backup.sh"]
    ours = [line for line in lines if line.endswith(f"# nbflow schedule {root}")]
    assert len(ours) == 1 and ours[0].startswith(f"0 7 * * * cd {root.parent} && ")


def test_install_into_an_empty_crontab(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    table = fake_crontab(tmp_path, None)
    result = schedule(str(root), "--cron", "@daily", "--install", env={"PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin"})
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"@daily cd .* run {re.escape(str(root))} >> .*# nbflow schedule {re.escape(str(root))}\n",
                        table.read_text())


def test_install_without_crontab_says_how_to_get_cron(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    result = schedule(str(root), "--cron", "0 6 * * *", "--install", env={"PATH": str(tmp_path)})
    assert result.exit_code == 1
    assert "\n0 6 * * * cd " in result.output  # the line is still printed, to add by hand
    assert "no `crontab` program" in result.output and "apt-get install cron" in result.output


def test_the_line_runs_the_pipeline_in_cron_s_bare_environment(fixture_pipeline):
    """cron starts commands with almost no environment: the line must carry what the run needs."""
    import subprocess

    root = fixture_pipeline("diamond")
    line = schedule(str(root), "--cron", "* * * * *").output.splitlines()[0]
    command = line.split(" ", 5)[5].rsplit(" # nbflow schedule", 1)[0].replace("\\%", "%")
    proc = subprocess.run(["env", "-i", "/bin/sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + (root / "_nbflow" / "cron.log").read_text()
    assert (root / "data" / "d.txt").read_text() == "43|c42"
    assert "succeeded" in (root / "_nbflow" / "cron.log").read_text()


def test_cron_expressions_become_systemd_calendars_that_systemd_accepts(fixture_pipeline):
    import shutil
    import subprocess

    from nbflow.scheduling import on_calendar

    cases = {"0 6 * * *": "*-*-* 06:00:00", "30 */2 * * 1-5": "Mon..Fri *-*-* 00/2:30:00",
             "15 8 1 * *": "*-*-01 08:15:00", "0 0 * * 0,6": "Sun,Sat *-*-* 00:00:00", "@daily": "*-*-* 00:00:00"}
    for cron, calendar in cases.items():
        assert on_calendar(cron) == calendar
        if shutil.which("systemd-analyze"):
            check = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True, text=True)
            assert check.returncode == 0, (calendar, check.stderr)
    root = fixture_pipeline("diamond")
    result = schedule(str(root), "--cron", "30 */2 * * 1-5", "--systemd")
    assert result.exit_code == 0, result.output
    assert "OnCalendar=Mon..Fri *-*-* 00/2:30:00" in result.output and "Persistent=true" in result.output
    assert "ExecStart=/bin/sh -c " in result.output and "NBFLOW_TRIGGER=schedule" in result.output
    both = schedule(str(root), "--cron", "0 6 1 * 1", "--systemd")
    assert both.exit_code == 2 and "give one of the two as *" in both.output


def test_a_tick_that_finds_a_run_in_progress_is_recorded_as_skipped(fixture_pipeline, monkeypatch):
    import nbflow
    from nbflow.errors import PipelineLocked
    from nbflow.state import RunLock

    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok
    lock = RunLock(root / "_nbflow")
    lock.acquire("a-long-run")
    monkeypatch.setenv("NBFLOW_TRIGGER", "schedule")
    try:
        try:
            nbflow.run(root, display=False)
        except PipelineLocked:
            pass
        else:
            raise AssertionError("a second run must be refused")
    finally:
        lock.release()
    latest = nbflow.show(root)
    assert latest["status"] == "skipped" and latest["audit"]["trigger"] == "schedule"
    assert "a-long-run" in latest["audit"]["skipped"]
    monkeypatch.delenv("NBFLOW_TRIGGER")
    assert nbflow.run(root, display=False).ok
    assert nbflow.show(root)["audit"]["trigger"] == "manual"
