"""Repeat a benchmark as independent processes and report each ratio as the median and range over the runs.

One run's median over its rounds hides what varies between runs (process start-up, memory layout, what else the
machine does): the figure a reader sees on re-running the command is one draw from the spread between runs. With
``--runs N`` (N > 1) a benchmark script re-executes itself N times, each child with ``--runs 1 --no-write``,
reads the ratio rows each child prints (``| NAME | WALL | CPU | target |`` under a ``### GROUP`` heading where it has
groups), and writes a table of the median, minimum and maximum of every ratio over the runs, followed by the last
run's full table.
"""
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from typing import Dict, List, Tuple

RATIO_ROW = re.compile(r"^\| (?P<name>[^|]+ / [^|]+?) \| (?P<wall>[0-9.]+) \| (?P<cpu>[0-9.]+) \| (?P<target>[^|]*)\|")


def add_arguments(parser) -> None:
    parser.add_argument("--runs", type=int, default=1,
                        help="independent runs (separate processes); with N > 1 the results give every ratio's "
                        "median and range over the runs")


def parse_ratio_rows(stdout: str) -> Dict[str, Tuple[float, float, str]]:
    """{'GROUP: a / b': (wall ratio, CPU ratio, target)} from one run's printed tables."""
    rows, group = {}, ""
    for line in stdout.splitlines():
        if line.startswith("### "):
            group = line[4:].strip()
        match = RATIO_ROW.match(line)
        if match:
            name = f"{group}: {match['name'].strip()}" if group else match["name"].strip()
            rows[name] = (float(match["wall"]), float(match["cpu"]), match["target"].strip())
    return rows


def child_argv(argv: List[str]) -> List[str]:
    """The script's own arguments with --runs dropped, run once and writing nothing."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--runs":
            skip = True
            continue
        if arg.startswith("--runs="):
            continue
        out.append(arg)
    return out + ["--runs", "1", "--no-write"]


def spread(values: List[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def render_summary(command: str, runs: List[Dict[str, Tuple[float, float, str]]], last_stdout: str) -> str:
    names = [n for n in runs[0] if all(n in r for r in runs)]
    lines = [f"## Median and range over {len(runs)} independent runs "
             f"({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})", "", "Command (from the repository root):", "",
             "```", command, "```", "",
             "Each run is a separate process that measures every variant over its own interleaved rounds and takes "
             "medians over them; below, each ratio's median over the runs and, in brackets, its minimum and maximum. "
             f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.", "",
             "| ratio | CPU: median (min-max) | wall: median (min-max) | per-run CPU values | target |",
             "|---|---:|---:|---|---|"]
    for n in names:
        cpu = [r[n][1] for r in runs]
        wall = [r[n][0] for r in runs]
        lines.append(f"| {n} | {spread(cpu)} | {spread(wall)} | {', '.join(f'{v:.3f}' for v in cpu)} "
                     f"| {runs[0][n][2]} |")
    table_start = last_stdout.find("## ")
    last_table = last_stdout[table_start:] if table_start >= 0 else ""
    if last_table.startswith("## "):
        last_table = "#" + last_table  # a subsection of the summary
    return "\n".join(lines) + "\n\n## The last run's full table\n\n" + last_table


def repeat(cli, script: str) -> bool:
    """Runs ``script`` cli.runs times when cli.runs > 1 and writes the summary; False when there is nothing to repeat."""
    if cli.runs <= 1:
        return False
    argv = child_argv(sys.argv[1:])
    command = "python3 " + " ".join(shlex.quote(a) for a in [script] + sys.argv[1:])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs, stdout = [], ""
    for i in range(cli.runs):
        proc = subprocess.run([sys.executable, os.path.join(repo, script), *argv], cwd=repo, text=True,
                              capture_output=True)
        if proc.returncode != 0:
            sys.exit(f"run {i + 1} of {cli.runs} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        stdout = proc.stdout
        runs.append(parse_ratio_rows(stdout))
        print(f"run {i + 1}/{cli.runs}: " + ", ".join(f"{n} {v[1]:.3f}" for n, v in runs[-1].items()), flush=True)
    summary = render_summary(command, runs, stdout)
    print()
    print(summary)
    if not cli.no_write:
        os.makedirs(cli.out_dir, exist_ok=True)
        with open(os.path.join(cli.out_dir, cli.out_name + ".md"), "w") as f:
            f.write(f"# {script} results\n\n" + summary)
        with open(os.path.join(cli.out_dir, cli.out_name + ".log"), "a") as f:
            f.write(json.dumps({"run": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
                                "independent_runs": [{n: v[:2] for n, v in r.items()} for r in runs]}) + "\n")
    return True
