"""Where an opsctl run's memory goes: opsctl's own CLI under tracemalloc.

    python bench/memprofile.py OUT.txt apply POLICY --dry-run --format json

Takes a snapshot just before the JSON report is serialised (the run, the
snapshot of Redis and the report document are all alive then) and writes the
top allocation sites, the traced peak and the process's peak RSS to OUT.txt.
tracemalloc slows the run several times over: never time this.
"""

from __future__ import annotations

import resource
import sys
import tracemalloc
from typing import Any

FRAMES = 8
TOP = 25


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    tracemalloc.start(FRAMES)
    from opsctl import cli, report

    snapshots: list[tuple[tracemalloc.Snapshot, int]] = []
    write_run_json = report.write_run_json

    def snapshot_then_write(*args: Any) -> None:
        snapshots.append((tracemalloc.take_snapshot(), tracemalloc.get_traced_memory()[0]))
        write_run_json(*args)

    report.write_run_json = snapshot_then_write  # type: ignore[assignment]
    sys.argv = ["opsctl", *argv]
    try:
        cli.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        write(out_path, snapshots)


def write(path: str, snapshots: list[tuple[tracemalloc.Snapshot, int]]) -> None:
    _current, peak = tracemalloc.get_traced_memory()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"traced peak {peak / 2**20:.1f} MiB; peak RSS {rss_mb:.1f} MiB (with tracemalloc)"]
    for snapshot, traced in snapshots:
        lines.append(f"\nbefore the JSON report is serialised: {traced / 2**20:.1f} MiB traced")
        snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        lines.append(f"\ntop {TOP} lines:")
        for stat in snapshot.statistics("lineno")[:TOP]:
            lines.append(
                f"  {stat.size / 2**20:7.1f} MiB {stat.count:>9} blocks  {stat.traceback[0]}"
            )
        lines.append(f"\ntop {TOP // 2} call paths:")
        for stat in snapshot.statistics("traceback")[: TOP // 2]:
            lines.append(f"  {stat.size / 2**20:7.1f} MiB {stat.count:>9} blocks")
            lines += [f"      {frame}" for frame in stat.traceback.format()[-2 * FRAMES :]]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
