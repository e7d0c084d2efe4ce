"""How ``opsctl watch`` takes up edits of its policy file, without Redis."""

from __future__ import annotations

from pathlib import Path

from opsctl.policy import Policy, load_policy
from opsctl.watch import RoundResult, Watch

V1 = 'version: 1\ndefaults:\n  max_age: 10m\nqueues:\n  - name: "*"\n'
V2 = 'version: 1\ndefaults:\n  max_age: 5m\nqueues:\n  - name: "*"\n'
HALF_WRITTEN = "version: 1\nqueues:\n  - name: [\n"


def test_a_policy_rewritten_while_watch_reads_it_is_the_one_it_told_apart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(V1)
    used: list[int] = []

    def load(file: str, raw: bytes | None = None) -> Policy:
        # An editor rewrites the file in place again just as watch parses it.
        path.write_text(HALF_WRITTEN)
        try:
            return load_policy(file, raw=raw) if raw is not None else load_policy(file)
        finally:
            path.write_text(V2)

    def round_fn(policy: Policy, _stopping: object) -> RoundResult:
        used.append(policy.defaults.max_age_seconds)
        if len(used) == 3:
            loop.request_stop(15)
        return RoundResult(None, 0)

    loop = Watch(load_policy(str(path)), load, round_fn, every_s=0.01)
    path.write_text(V2)

    loop.run()

    # The edit that ended valid is in force from the round that saw it on.
    assert used == [300, 300, 300]
