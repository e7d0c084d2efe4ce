"""One cached virtual environment per RQ release the compatibility matrix covers.

Each environment lives in ``.compat-venvs/rq-<version>`` at the top of the checkout
(git-ignored) and holds ``rq==<version>`` and what pip picks for it. It is built on
first use and rebuilt only when it is missing or broken (its interpreter cannot import
the RQ release it is named after). The release the main environment already has is
used from there, without a second copy.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

COMPAT_DIR = Path(__file__).resolve().parent
TESTS_DIR = COMPAT_DIR.parent
CHECKOUT = TESTS_DIR.parent
VENVS_DIR = CHECKOUT / ".compat-venvs"

#: The releases covered: the last 1.x, the latest 2.x, and the 3.x the main environment has.
VERSIONS = ("1.16.2", "2.12.0", "3.0.0")

#: How long one `pip install` may take, in seconds (it downloads from the package index).
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class RQEnv:
    """An interpreter with one RQ release: run its `rq` CLI and the checker with it."""

    version: str
    python: Path

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def rq_command(self) -> list[str]:
        """The `rq` command line of this release (its console script)."""
        script = self.python.parent / "rq"
        return [str(script)] if script.exists() else [str(self.python), "-m", "rq.cli"]


def _has_release(python: Path, version: str) -> bool:
    if not python.exists():
        return False
    probe = f"import rq, sys; sys.exit(0 if rq.__version__ == {version!r} else 1)"
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _build(target: Path, version: str) -> None:
    shutil.rmtree(target, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(target)],
        [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", f"rq=={version}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            pytest.fail(
                f"could not build the RQ {version} environment ({' '.join(step[-3:])}):\n"
                f"{done.stdout}\n{done.stderr}",
                pytrace=False,
            )


def rq_env(version: str) -> RQEnv:
    """The environment for RQ ``version``, built now if missing or broken."""
    main = Path(sys.executable)
    if _has_release(main, version):
        return RQEnv(version, main)
    VENVS_DIR.mkdir(exist_ok=True)
    target = VENVS_DIR / f"rq-{version}"
    python = target / "bin" / "python"
    # Two test sessions in one checkout build an environment once, not twice at a time.
    with (VENVS_DIR / f"rq-{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _has_release(python, version):
            _build(target, version)
        if not _has_release(python, version):
            pytest.fail(f"the RQ {version} environment does not import rq {version}", pytrace=False)
    return RQEnv(version, python)
