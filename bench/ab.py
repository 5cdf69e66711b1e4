"""Regression check: this checkout's conveyor against another revision's, paired in one run.

    python bench/ab.py --base REV [--rounds 5] [--threshold 5] [--write] -- SCRIPT [ARGS...]

e.g. ``python bench/ab.py --base HEAD~1 -- bench/pipeline.py --rounds 3 --scenario overhead io``.

* base: a git worktree of REV, made outside the checkout (under $TMPDIR, or
  --worktrees, in ``conveyor-ab/<sha>``, with ``git worktree add --detach``)
  and reused by later calls. The compiled accelerator
  (src/conveyor/_speedups*.so) of this tree is copied into it when both
  trees' src/conveyor/_speedups.c are identical; otherwise the base runs
  without it, and the output says so.
* new: this working tree as it is, uncommitted changes included (the output
  says whether src/ has any); or, with --new REV, a worktree of REV made the
  same way (to leave out work in progress).

Both sides run the same bench script file, this tree's, with the same
arguments, so the workloads are identical; only the conveyor it imports
differs, chosen by CONVEYOR_BENCH_SRC (and PYTHONPATH), which the bench
scripts honour and which reaches their worker processes (see
bench/_common.py). Each run writes ``--json``: per workload, conveyor's
throughput and its ratio to the reference peer of that run (hand-written
queue.Queue pipeline, multiprocessing.Pool, hand-written redis-py loop). The
sides alternate round by round, A B B A A B ..., to cancel drift.

Per workload the report gives, over the rounds, the median of
new ratio / base ratio (each round's two runs paired), its range, and a
verdict: within +-threshold % of the base, or slower / faster. Comparing
ratios to a peer measured in the same run, rather than raw throughputs,
cancels most of the machine's load changes between runs. The exit status is
1 when some workload is slower than the threshold allows, 0 otherwise.

Nothing is written to the docs unless --write is given: then the section
"Regression check against <sha>" of docs/benchmarks.md gets (or replaces) a
block for this script, with the machine and the table.

Run it with a Python that has the bench scripts' packages (a venv with
``pip install -e '.[all,bench]'``); it runs the scripts with the same
interpreter (nothing is built: the accelerator is copied, see above). The
bench scripts' own logs and JSON files are kept in the run's folder, printed
at the start. Use the scripts' --reference-only (pipeline.py, runtimes.py) and
redis.py's --no-celery to leave out peers the check does not use. Worktrees
stay for the next call: ``git worktree remove --force PATH`` removes one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import BENCHMARKS_MD, ROOT, SRC_ENV, machine, write_section

SPEEDUPS_DIR = Path("src") / "conveyor"


# ---------------------------------------------------------------------- git


def git(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


def resolve(rev: str) -> str:
    proc = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if proc.returncode:
        sys.exit(f"ab.py: {rev!r} is not a commit here")
    return proc.stdout.strip()


def describe(sha: str) -> str:
    """Short sha and subject (cut at 70 characters)."""
    line = git("log", "-1", "--format=%h %s", sha).stdout.strip()
    return line if len(line) <= 70 else line[:69] + "…"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (two checks setting up one worktree at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def worktree(sha: str, parent: Path) -> Path:
    """A detached worktree of ``sha`` in ``parent/<sha>``: made once, then reused."""
    path = parent / sha
    if path.exists():
        head = git("rev-parse", "HEAD", cwd=path, check=False).stdout.strip()
        if head != sha or not (path / ".git").exists():
            sys.exit(
                f"ab.py: {path} exists but is not a worktree at {sha[:12]}: "
                f"remove it (git worktree remove --force {path}) and try again"
            )
        changed = git("status", "--porcelain", "--untracked-files=no", cwd=path).stdout
        if changed.strip():
            sys.exit(f"ab.py: the worktree {path} has changes to tracked files:\n{changed}")
        return path
    proc = git("worktree", "add", "--detach", str(path), sha, check=False)
    if proc.returncode:  # a worktree once registered there, its folder since removed
        proc = git("worktree", "add", "--force", "--detach", str(path), sha, check=False)
    if proc.returncode:
        sys.exit(f"ab.py: git worktree add failed:\n{proc.stderr}")
    return path


def accelerator(base: Path, side: str = "base") -> str:
    """Copy this tree's compiled accelerator into ``base`` if the C source is the same."""
    here, there = ROOT / SPEEDUPS_DIR, base / SPEEDUPS_DIR
    built = sorted(here.glob("_speedups*.so"))
    stale = sorted(there.glob("_speedups*.so"))
    source = here / "_speedups.c"
    if not built:
        for so in stale:
            so.unlink()
        return "no compiled accelerator in this tree: both sides run pure Python"
    note = ""
    if source.exists() and min(so.stat().st_mtime for so in built) < source.stat().st_mtime:
        note = " (warning: it is older than this tree's _speedups.c: rebuild it)"
    base_source = there / "_speedups.c"
    if not (base_source.exists() and base_source.read_bytes() == source.read_bytes()):
        for so in stale:
            so.unlink()
        return (
            f"the {side}'s _speedups.c differs from this tree's: the {side} runs WITHOUT the "
            f"accelerator{note}"
        )
    for so in built:
        target = there / so.name
        if not target.exists() or target.read_bytes() != so.read_bytes():
            shutil.copy2(so, target)
    names = ", ".join(so.name for so in built)
    return f"{names} copied into the {side} (same _speedups.c){note}"


# ---------------------------------------------------------------------- running


class Side:
    def __init__(self, name: str, tree: Path) -> None:
        self.name = name
        self.src = (tree / "src").resolve()
        self.runs: list[dict[str, Any]] = []
        self.seconds: list[float] = []


def run_bench(side: Side, script: Path, args: list[str], folder: Path, round_: int) -> None:
    """Run the bench script once against ``side``'s tree; keep its --json result."""
    out = folder / f"{round_:02d}-{side.name}.json"
    log = folder / f"{round_:02d}-{side.name}.log"
    env = dict(os.environ)
    env[SRC_ENV] = str(side.src)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(side.src), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, str(script), *args, "--json", str(out)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=False,
        )
    seconds = time.perf_counter() - started
    if proc.returncode or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"ab.py: the {side.name} run failed (exit {proc.returncode}), see {log}:\n{tail}")
    data = json.loads(out.read_text())
    imported = Path(data["conveyor"])
    if imported != side.src / "conveyor":
        sys.exit(f"ab.py: the {side.name} run imported {imported}, not {side.src / 'conveyor'}")
    side.runs.append(data)
    side.seconds.append(seconds)
    print(f"  round {round_ + 1} {side.name}: {seconds:.0f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- report


def compare(base: Side, new: Side, threshold: float) -> tuple[list[list[str]], bool]:
    """Table rows per workload, and whether some workload is slower than allowed."""
    names = [
        name
        for name in new.runs[0]["workloads"]
        if all(name in run["workloads"] for run in base.runs + new.runs)
    ]
    rows, slower = [], False
    for name in names:
        b = [run["workloads"][name] for run in base.runs]
        n = [run["workloads"][name] for run in new.runs]
        paired = [y["ratio"] / x["ratio"] for x, y in zip(b, n, strict=True)]
        raw = [y["throughput"] / x["throughput"] for x, y in zip(b, n, strict=True)]
        mid = statistics.median(paired)
        change = 100 * (mid - 1)
        if abs(change) <= threshold:
            verdict = f"within ±{threshold:g}%"
        else:
            verdict = f"{'slower' if change < 0 else 'faster'} ({change:+.1f}%)"
            slower = slower or change < 0
        rows.append(
            [
                name,
                n[0]["peer"],
                f"{statistics.median(x['ratio'] for x in b):.3g}x",
                f"{statistics.median(y['ratio'] for y in n):.3g}x",
                f"{mid:.3f}",
                f"{min(paired):.3f} - {max(paired):.3f}",
                f"{statistics.median(raw):.3f}",
                verdict,
            ]
        )
    missing = sorted({w for run in base.runs + new.runs for w in run["workloads"]} - set(names))
    for name in missing:
        rows.append([name, "-", "-", "-", "-", "-", "-", "not in every run: not compared"])
    return rows, slower


def table(rows: list[list[str]]) -> list[str]:
    head = [
        "workload",
        "peer",
        "base: conveyor / peer",
        "new: conveyor / peer",
        "new / base (median)",
        "range",
        "throughput new / base",
        "verdict",
    ]
    return [
        "| " + " | ".join(head) + " |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def write_block(short: str, script: str, text: str) -> Path:
    """Put ``text`` in the "Regression check against <short>" section, a block per script."""
    tag = f"regression-{short}"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    old = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    section = old.split(begin, 1)[1].split(end, 1)[0] if begin in old and end in old else ""
    marker = re.escape(f"<!-- {tag}/")
    blocks = {
        m[1]: m[2].strip("\n")
        for m in re.finditer(rf"{marker}(\S+?):begin -->(.*?){marker}\1:end -->", section, re.S)
    }
    blocks[script] = text.strip("\n")
    parts = [f"## Regression check against {short}"]
    parts += [
        f"<!-- {tag}/{name}:begin -->\n{body}\n<!-- {tag}/{name}:end -->"
        for name, body in blocks.items()
    ]
    return write_section("\n\n".join(parts), tag)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ours, theirs = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__,
        usage="python bench/ab.py --base REV [options] -- SCRIPT [ARGS...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--new", help="a revision to check instead of this working tree")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each side (default 5)")
    parser.add_argument(
        "--threshold", type=float, default=5.0, help="percent, either way (default 5)"
    )
    parser.add_argument(
        "--worktrees",
        type=Path,
        default=Path(tempfile.gettempdir()) / "conveyor-ab",
        help="where the base worktrees live (default $TMPDIR/conveyor-ab)",
    )
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(ours)
    if not theirs:
        parser.error("name the bench script after --")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    script, script_args = Path(theirs[0]).resolve(), theirs[1:]
    if not script.is_file():
        parser.error(f"no such bench script: {theirs[0]}")
    if any(a in ("--write", "--json") or a.startswith("--json=") for a in script_args):
        parser.error("the bench script's --write and --json are ab.py's to set")
    worktrees = args.worktrees.resolve()
    if worktrees.is_relative_to(ROOT):
        parser.error("--worktrees must be outside the checkout")

    load = os.getloadavg()[0]
    started = time.perf_counter()
    base_sha, head_sha = resolve(args.base), resolve("HEAD")
    new_sha = resolve(args.new) if args.new else None
    with locked(worktrees / ".lock"):
        tree = worktree(base_sha, worktrees)
        speedups = accelerator(tree)
        if new_sha:
            new_tree = worktree(new_sha, worktrees)
            speedups += "; " + accelerator(new_tree, "new side")
    dirty = git("status", "--porcelain", "--", "src").stdout.splitlines()
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=worktrees))
    rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    command = " ".join([str(rel), *script_args])
    if new_sha:
        new_is = describe(new_sha)
    else:
        new_tree = ROOT
        new_is = f"this working tree (HEAD {describe(head_sha)})" + (
            f", with uncommitted changes to {len(dirty)} path(s) under src/" if dirty else ""
        )
    print(f"base: {describe(base_sha)}, worktree {tree}", file=sys.stderr)
    print(f"new: {new_is}", file=sys.stderr)
    print(f"accelerator: {speedups}", file=sys.stderr)
    print(f"bench: python {command}; logs and JSON in {folder}", file=sys.stderr, flush=True)

    base, new = Side("base", tree), Side("new", new_tree)
    for round_ in range(args.rounds):
        for side in (base, new) if round_ % 2 == 0 else (new, base):
            run_bench(side, script, script_args, folder, round_)
    elapsed = time.perf_counter() - started

    rows, slower = compare(base, new, args.threshold)
    accelerated = {s.name: {r.get("accelerated") for r in s.runs} for s in (base, new)}
    short = base_sha[:12]
    runs = base.seconds + new.seconds
    new_arg = f" --new {args.new}" if args.new else ""
    lines = [
        f"`python bench/ab.py --base {args.base}{new_arg} --rounds {args.rounds} -- {command}`",
        "",
        f"Base: {describe(base_sha)}. New: {new_is}.",
        f"Machine: {machine()}; load average {load:.1f} at the start; "
        f"{time.strftime('%Y-%m-%d %H:%M')}.",
        f"Accelerator: {speedups}; imported by base {sorted(accelerated['base'], key=str)}, "
        f"by new {sorted(accelerated['new'], key=str)}.",
        f"{args.rounds} rounds, base and new alternated (A B B A ...): {len(runs)} runs of "
        f"{statistics.median(runs):.0f} s (median), {elapsed / 60:.1f} min in all.",
        "",
        *table(rows),
        "",
        "conveyor / peer: conveyor's throughput over the reference peer's in the same run "
        "(median over the rounds). new / base: per round, the new run's ratio over the base "
        f"run's; its median decides the verdict (threshold ±{args.threshold:g}%), the range "
        "shows the spread. Throughput new / base compares raw figures, which the load moves.",
    ]
    text = "\n".join(lines)
    print(f"\n## Regression check against {short}\n\n{text}")
    if args.write:
        print(f"\nupdated {write_block(short, script.stem, text)}")
    sys.exit(1 if slower else 0)


if __name__ == "__main__":
    main()
