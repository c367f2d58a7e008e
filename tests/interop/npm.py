"""The pinned Grenache npm packages of tests/interop, installed once on demand.

Shared by the interop test and the compose file's grenache-profile rehearsal
(which runs the grape from these packages: the same versions as the grape
image's lock, see tests/test_compose_netns.py)."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NPM_TIMEOUT_S = 300.0


def npm_ready() -> None:
    """``npm ci`` once, when the pinned packages are not installed yet; under a
    lock, so that two processes never install at once (npm ci empties
    node_modules first: the second failed with ENOTEMPTY).  Skips, saying why,
    without Node.js and npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed (.ci/run installs them: apt-get install nodejs npm)")
    with open(HERE / ".npm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (HERE / "node_modules" / "grenache-grape" / "package.json").exists():
            return
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(HERE)], cwd=HERE,
                              capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
