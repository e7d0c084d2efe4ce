"""Benchmark opsctl against the Redis-read floor and against RQ's own APIs.

    make bench BENCH_ARGS="--jobs 100000"        # or: python bench/run_bench.py --jobs 2000

Starts a private redis-server (127.0.0.1, a free port, no persistence), seeds it
with started RQ 3 jobs (see ``seed.py``), and times, each as its own process:

1. the floor (``floor.py``): only the Redis reads a dry run needs;
2. ``opsctl apply POLICY --dry-run --format json`` over every job;
3. RQ's ``Job.fetch`` per job (measured on a sample, scaled to all jobs);
4. RQ's ``Job.fetch_many``, 1000 ids a call, over every job;
5. ``opsctl apply POLICY`` failing 10,000 abandoned jobs, against RQ's
   ``StartedJobRegistry.cleanup`` on an identical copy of the data;
6. the dry run again at 10,000 jobs, for the scaling ratio; peak RSS of each run.

Prints one table (seconds, ratio to the floor, peak RSS, target, PASS/MISS) and
writes the same figures as JSON. A MISS never fails the run; a step that crashes
or reads the wrong number of jobs does (exit 1).
"""

from __future__ import annotations

import os

os.environ.pop("RQ_KEY_PREFIX", None)

import argparse
import compileall
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seed import Layout, RedisServer, Seeded, private_redis, seed, subscribe_live

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
#: Jobs in the sample runs (per-job fetch, the scaling run, the fail contest).
SAMPLE = 10_000

POLICY = """\
version: 1
redis:
  url: ${REDIS_URL}
  key_prefix: rq
defaults:
  max_age: 1d
  action: fail
  force: false
  dry_run: false
  enabled: true
queues:
  - name: "*"
"""


class StepFailed(Exception):
    """A measured step crashed or read something other than what was seeded."""


@dataclass
class Measured:
    """One child process: wall seconds, peak RSS, and what it printed."""

    seconds: float
    rss_mb: float
    stdout: str
    stderr: str
    redis_cpu_s: float | None = None  # CPU time the private Redis spent meanwhile
    #: Seconds Redis spent on each command meanwhile (INFO commandstats); a
    #: command a script runs counts both on its own and within the script.
    redis_commands: dict[str, float] = field(default_factory=dict)


@dataclass
class Row:
    """One line of the table and of the JSON."""

    step: str
    jobs: int
    seconds: float
    floor_s: float | None = None
    rss_mb: float | None = None
    target: str = ""
    result: str = ""  # PASS, MISS, or "" when the row carries no target
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.floor_s if self.floor_s else None


#: GNU time, when installed: it measures a child's peak RSS without the benchmark's own.
GNU_TIME = "/usr/bin/time"


def run_child(argv: list[str], env: dict[str, str], stdout_path: Path | None = None) -> Measured:
    """Run one process: wall seconds, peak RSS, and what it printed.

    Linux counts the memory of the process that forks a child into the child's
    peak RSS (it is carried over at exec), and this benchmark is large after
    seeding. So the child is started through GNU time, a small process, which
    reports the peak of the real command alone. Without GNU time the figure
    comes from wait4 and may include the benchmark's own size.
    """
    rss_file = tempfile.NamedTemporaryFile(suffix=".rss", delete=False)  # noqa: SIM115
    rss_file.close()
    timed = os.access(GNU_TIME, os.X_OK)
    if timed:
        argv = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv]
    out = open(stdout_path, "wb") if stdout_path else tempfile.TemporaryFile()  # noqa: SIM115
    with out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=ROOT)
        _pid, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
        stdout = ""
        if stdout_path is None:
            out.seek(0)
            stdout = out.read().decode("utf-8", "replace")
    rss_kb = float(usage.ru_maxrss)
    reported = Path(rss_file.name).read_text().split()
    os.unlink(rss_file.name)
    if timed and reported and reported[-1].isdigit():
        rss_kb = float(reported[-1])
    if process.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-15:])
        raise StepFailed(f"{' '.join(argv[-4:])} exited {process.returncode}:\n{tail}")
    return Measured(seconds, rss_kb / 1024, stdout, stderr)


def best_of(repeat: int, measure: Any) -> Measured:
    """The fastest of ``repeat`` runs (the least disturbed by the rest of the machine)."""
    return min((measure() for _ in range(repeat)), key=lambda m: m.seconds)


def child_json(m: Measured) -> dict[str, Any]:
    return json.loads(m.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class Bench:
    """One benchmark run against one private server."""

    def __init__(self, server: RedisServer, layout: Layout, args: argparse.Namespace) -> None:
        self.server, self.layout, self.args = server, layout, args
        self.work = Path(tempfile.mkdtemp(prefix="opsctl-bench-"))
        self.policy = self.work / "policy.yaml"
        self.policy.write_text(POLICY)
        self.env = {**os.environ, "REDIS_URL": server.url, "NO_COLOR": "1"}
        self.env.pop("RQ_KEY_PREFIX", None)
        self.rows: list[Row] = []

    # Seeding --------------------------------------------------------------------------------

    def reseed(self, jobs: int, all_dead: bool = False) -> Seeded:
        self.server.flush()
        started = time.perf_counter()
        seeded = seed(self.server, self.layout, jobs, all_dead=all_dead)
        took = time.perf_counter() - started
        what = "abandoned" if all_dead else "started"
        log(f"seeded {jobs} {what} jobs in {took:.1f}s ({seeded.abandoned} of dead workers)")
        return seeded

    # Contenders -----------------------------------------------------------------------------

    def floor(self, expected: int, *options: str) -> Measured:
        argv = [sys.executable, str(BENCH_DIR / "floor.py"), self.server.url, *options]
        m = best_of(self.args.repeat, lambda: run_child(argv, self.env))
        read = child_json(m)["entries"]
        if read != expected:
            raise StepFailed(f"floor read {read} entries, expected {expected}")
        return m

    def redis_cpu(self) -> float:
        """CPU seconds the private Redis has used so far (user and system)."""
        info = self.server.client().info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def with_redis_cpu(self, argv: list[str], stdout_path: Path | None = None) -> Measured:
        """Run one process and note how long Redis itself was busy meanwhile.

        Redis runs commands on one thread, so this is the least time any
        client could take for the same commands.
        """
        client = self.server.client()
        client.config_resetstat()
        before = self.redis_cpu()
        m = run_child(argv, self.env, stdout_path)
        m.redis_cpu_s = self.redis_cpu() - before
        stats = client.info("commandstats")
        m.redis_commands = {
            name.removeprefix("cmdstat_"): float(counts["usec"]) / 1e6
            for name, counts in sorted(stats.items(), key=lambda kv: -float(kv[1]["usec"]))
        }
        return m

    def opsctl_dry_run(self, seeded: Seeded, name: str) -> Measured:
        report = self.work / f"dry-run-{name}.json"
        argv = [sys.executable, "-m", "opsctl", "apply", str(self.policy)]
        argv += ["--dry-run", "--format", "json"]
        m = best_of(self.args.repeat, lambda: self.with_redis_cpu(argv, report))
        summary = json.loads(report.read_text())["summary"]
        if summary["inspected"] != seeded.jobs or summary["planned"] != seeded.abandoned:
            raise StepFailed(f"dry run summary {summary} does not match {seeded}")
        report.unlink()
        return m

    def opsctl_apply(self, seeded: Seeded, *options: str) -> Measured:
        report = self.work / "apply.out"
        argv = [sys.executable, "-m", "opsctl", "apply", str(self.policy), *options]
        m = run_child(argv, self.env, report)
        self._check_failed(seeded, "opsctl apply")
        return m

    def rq_cleanup(self, seeded: Seeded) -> Measured:
        argv = [sys.executable, str(BENCH_DIR / "rq_contenders.py"), self.server.url, "cleanup"]
        m = run_child(argv, self.env)
        self._check_failed(seeded, "RQ cleanup")
        return m

    def _check_failed(self, seeded: Seeded, who: str) -> None:
        conn = self.server.client()
        failed = sum(conn.zcard(f"rq:failed:{q}") for q in self.layout.queues)
        left = sum(conn.zcard(f"rq:wip:{q}") for q in self.layout.queues)
        statuses = conn.pipeline(transaction=False)
        for job_id in seeded.ids[:: max(1, len(seeded.ids) // 100)]:
            statuses.hget(f"rq:job:{job_id}", "status")
        not_failed = [s for s in statuses.execute() if s != b"failed"]
        if failed != seeded.jobs or left or not_failed:
            raise StepFailed(
                f"{who}: {failed} failed, {left} still started, "
                f"{len(not_failed)} sampled jobs not failed; expected {seeded.jobs} failed"
            )

    def rq_read(self, mode: str, *extra: str) -> Measured:
        argv = [sys.executable, str(BENCH_DIR / "rq_contenders.py"), self.server.url, mode]
        return run_child([*argv, *extra], self.env)

    def startup(self) -> Measured:
        argv = [sys.executable, "-m", "opsctl", "--version"]
        return best_of(3, lambda: run_child(argv, self.env))

    # The run --------------------------------------------------------------------------------

    def run(self) -> None:
        """Every measurement, then the verdicts against the targets."""
        n, sample = self.args.jobs, min(SAMPLE, self.args.jobs)
        self.measure_reads(n, sample)
        if sample < n:
            self.measure_sample_dry_run(sample)
        self.measure_fail_contest(sample)
        self.judge()

    def measure_reads(self, n: int, sample: int) -> None:
        """Floor, dry run and RQ's read APIs over all ``n`` jobs."""
        seeded = self.reseed(n)
        floor = self.floor(n)
        self.add("floor: Redis reads only", n, floor, floor.seconds, detail=child_json(floor))
        scripted = self.floor(n, "--scripted")
        self.add("  same reads, opsctl's read script", n, scripted, floor.seconds)
        dry = self.opsctl_dry_run(seeded, "n")
        self.add("opsctl apply --dry-run", n, dry, floor.seconds)
        self.add("  of which start-up (--version)", 0, self.startup(), floor.seconds)
        busy = dry.redis_cpu_s or 0.0
        by_command = {name: s for name, s in dry.redis_commands.items() if s >= 0.01}
        self.rows.append(
            Row("  Redis busy meanwhile (server CPU)", n, busy, floor.seconds, detail=by_command)
        )
        spent = ", ".join(f"{name} {s:.2f}s" for name, s in by_command.items())
        log(f"Redis busy during the dry run [{n}]: {busy:.2f}s ({spent})")

        fetch = self.rq_read("fetch", str(sample))
        info = child_json(fetch)
        scaled = fetch.seconds + info["fetch_s"] * (info["ids"] / info["sample"] - 1)
        step = f"RQ Job.fetch per job ({info['sample']} scaled)"
        self.rows.append(Row(step, n, scaled, floor.seconds, fetch.rss_mb, detail=info))
        log(f"{step} [{n}]: {scaled:.2f}s")

        many = self.rq_read("fetch_many")
        if child_json(many)["jobs"] != n:
            raise StepFailed(f"fetch_many found {child_json(many)['jobs']} jobs, expected {n}")
        self.add("RQ Job.fetch_many (1000/call)", n, many, floor.seconds, detail=child_json(many))

    def measure_sample_dry_run(self, sample: int) -> None:
        """The dry run on a smaller copy, for the scaling ratio."""
        seeded = self.reseed(sample)
        floor = self.floor(sample)
        self.add("floor: Redis reads only", sample, floor, floor.seconds)
        dry = self.opsctl_dry_run(seeded, "sample")
        self.add("opsctl apply --dry-run", sample, dry, floor.seconds)

    def measure_fail_contest(self, sample: int) -> None:
        """Failing ``sample`` abandoned jobs: opsctl, then RQ, each on a fresh identical copy."""
        abandoned = self.reseed(sample, all_dead=True)
        floor = self.floor(sample)
        self.add("floor: Redis reads only (abandoned)", sample, floor, floor.seconds)
        applied = self.opsctl_apply(abandoned)
        self.add("opsctl apply (fail all)", sample, applied, floor.seconds)

        # The same with the JSON report: how much of the above is the text table.
        abandoned = self.reseed(sample, all_dead=True)
        applied = self.opsctl_apply(abandoned, "--format", "json")
        self.add("  same, --format json", sample, applied, floor.seconds)

        abandoned = self.reseed(sample, all_dead=True)
        cleanup = self.rq_cleanup(abandoned)
        detail = child_json(cleanup)
        step = f"RQ cleanup ({detail['queues']} queues)"
        self.add(step, sample, cleanup, floor.seconds, detail=detail)

    def profile(self, where: Path) -> None:
        """cProfile and tracemalloc runs of opsctl (untimed), for finding where time goes."""
        where.mkdir(parents=True, exist_ok=True)
        n, sample = self.args.jobs, min(SAMPLE, self.args.jobs)
        base = ["apply", str(self.policy)]
        self.reseed(n)
        prof = [sys.executable, "-m", "cProfile", "-o"]
        run_child([*prof, str(where / "dry-run.prof"), "-m", "opsctl", *base,
                   "--dry-run", "--format", "json"], self.env, self.work / "p.out")  # fmt: skip
        memory = [
            sys.executable,
            str(BENCH_DIR / "memprofile.py"),
            str(where / "dry-run-memory.txt"),
        ]
        run_child([*memory, *base, "--dry-run", "--format", "json"], self.env, self.work / "p.out")
        self.reseed(sample, all_dead=True)
        run_child([*prof, str(where / "apply.prof"), "-m", "opsctl", *base],
                  self.env, self.work / "p.out")  # fmt: skip
        log(f"profiles in {where}: read them with python -m pstats FILE.prof")

    def add(
        self,
        step: str,
        jobs: int,
        m: Measured,
        floor_s: float,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.rows.append(Row(step, jobs, m.seconds, floor_s, m.rss_mb, detail=detail or {}))
        log(f"{step} [{jobs}]: {m.seconds:.2f}s, peak RSS {m.rss_mb:.0f} MB")

    # Targets --------------------------------------------------------------------------------

    def find(self, prefix: str, jobs: int) -> Row | None:
        return next((r for r in self.rows if r.step.startswith(prefix) and r.jobs == jobs), None)

    def judge(self) -> None:
        n, sample = self.args.jobs, min(SAMPLE, self.args.jobs)
        dry, floor = self.find("opsctl apply --dry-run", n), self.find("floor", n)
        fetch, many = self.find("RQ Job.fetch per", n), self.find("RQ Job.fetch_many", n)
        apply, cleanup = self.find("opsctl apply (fail", sample), self.find("RQ cleanup", sample)
        assert dry and floor and fetch and many and apply and cleanup
        mark(dry, "≤ 1.5x floor", dry.seconds <= 1.5 * floor.seconds)
        scripted = self.find("  same reads, opsctl's read script", n)
        if scripted:
            # For reference only: the target is set against the pipelined floor above.
            scripted.target = f"dry run is {dry.seconds / scripted.seconds:.2f}x these reads"
        mark(fetch, f"opsctl ≥ 10x faster: {fetch.seconds / dry.seconds:.1f}x",
             fetch.seconds >= 10 * dry.seconds)  # fmt: skip
        mark(many, f"opsctl ≥ 3x faster: {many.seconds / dry.seconds:.1f}x",
             many.seconds >= 3 * dry.seconds)  # fmt: skip
        busy = self.find("  Redis busy", n)
        if busy is not None:
            # What the two read targets leave for a dry run, next to the time
            # Redis alone spent on the dry run's commands.
            budget = min(fetch.seconds / 10, many.seconds / 3)
            busy.target = f"the read targets allow a dry run of {budget:.2f}s"
            busy.detail["budget_s"] = budget
        mark(cleanup, f"opsctl ≤ RQ: {cleanup.seconds / apply.seconds:.2f}x faster",
             apply.seconds <= cleanup.seconds)  # fmt: skip
        rss = Row("peak RSS, dry run", n, dry.rss_mb or 0.0)
        rss.detail = {"rss_mb": dry.rss_mb}
        mark(rss, "≤ 200 MB", (dry.rss_mb or 0) <= 200)
        self.rows.append(rss)
        small = self.find("opsctl apply --dry-run", sample)
        if small is not None and sample < n:
            allowed = 1.2 * n / sample
            ratio = dry.seconds / small.seconds
            scale = Row(f"scaling: dry run {n} / {sample}", n, ratio)
            scale.detail = {"ratio": ratio, "allowed": allowed}
            mark(scale, f"≤ {allowed:g} (linear {n / sample:g})", ratio <= allowed)
            self.rows.append(scale)


def mark(row: Row, target: str, ok: bool) -> None:
    row.target, row.result = target, "PASS" if ok else "MISS"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def print_table(rows: list[Row]) -> None:
    header = f"{'step':<40} {'jobs':>7} {'seconds':>9} {'xfloor':>7} {'RSS MB':>7}  target"
    print(header)
    print("-" * (len(header) + 30))
    for r in rows:
        if r.step.startswith(("peak RSS", "scaling")):
            value = f"{r.seconds:9.1f}" if r.step.startswith("peak") else f"{r.seconds:8.2f}x"
            print(f"{r.step:<40} {r.jobs:>7} {value:>9} {'':>7} {'':>7}  {r.target} {r.result}")
            continue
        ratio = f"{r.ratio:6.2f}x" if r.ratio is not None else ""
        rss = f"{r.rss_mb:7.0f}" if r.rss_mb is not None else ""
        target = f"{r.target} {r.result}".strip()
        print(f"{r.step:<40} {r.jobs:>7} {r.seconds:9.2f} {ratio:>7} {rss:>7}  {target}")


def git(*argv: str) -> str:
    try:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def write_json(path: Path, args: argparse.Namespace, rows: list[Row], server: RedisServer) -> None:
    diff = git("diff", "HEAD", "--", "src")
    document = {
        "commit": git("rev-parse", "--short", "HEAD"),
        # Others edit src/ between commits: this tells two runs of one commit apart.
        "src_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        "jobs": args.jobs,
        "queues": args.queues,
        "workers": args.workers,
        "repeat": args.repeat,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "redis_server": server.client().info("server").get("redis_version"),
        "cpus": os.cpu_count(),
        # Other work on the machine slows every step; compare runs made under similar load.
        "load_average_at_end": os.getloadavg(),
        "rows": [{**asdict(r), "ratio_to_floor": r.ratio} for r in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="started jobs to seed")
    parser.add_argument("--queues", type=int, default=10, help="queues to spread them over")
    parser.add_argument("--workers", type=int, default=50, help="workers; half of them dead")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each read step (best kept)")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="also profile opsctl (untimed) into DIR"
    )
    parser.add_argument(
        "--json-out", type=Path, default=BENCH_DIR / "results.json", help="where to write JSON"
    )
    args = parser.parse_args()
    if args.jobs < args.queues or args.workers < 2 or args.queues < 1:
        parser.error("need --jobs ≥ --queues ≥ 1 and --workers ≥ 2")
    return args


def main() -> int:
    args = parse_args()
    # An installed package carries its compiled bytecode; a checkout run with
    # PYTHONDONTWRITEBYTECODE set would compile every module at every start.
    compileall.compile_dir(ROOT / "src", quiet=1)
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"load average is {load:.2f}: other work on this machine will skew the figures")
    with private_redis() as server:
        layout = Layout.make(args.queues, args.workers)
        subscription = subscribe_live(server, layout)  # held for the whole run
        bench = Bench(server, layout, args)
        try:
            bench.run()
            if args.profile:
                bench.profile(args.profile)
        except StepFailed as exc:
            print(f"bench: step failed: {exc}", file=sys.stderr)
            return 1
        finally:
            subscription.close()
            shutil.rmtree(bench.work, ignore_errors=True)
        print_table(bench.rows)
        write_json(args.json_out, args, bench.rows, server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
