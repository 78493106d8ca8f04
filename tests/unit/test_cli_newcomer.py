"""The newcomer path: `python -m foundry_local_py` is the CLI, and shell completion is reachable
(and completes the generated serve flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "foundry_local_py", *args], capture_output=True, text=True,
                          env=full, timeout=120, check=False)


def test_python_dash_m_is_the_cli():
    done = _run("--help")
    assert done.returncode == 0 and "foundry-local" in done.stdout
    for verb in ("serve", "model", "cache", "service", "docs"):
        assert verb in done.stdout
    assert "--install-completion" in done.stdout


def test_shell_completion_completes_verbs_and_generated_flags():
    env = {"_FOUNDRY_LOCAL_COMPLETE": "complete_bash", "COMP_WORDS": "foundry-local mo", "COMP_CWORD": "1"}
    assert _run(env=env).stdout.split() == ["model"]
    env.update(COMP_WORDS="foundry-local serve --max-b", COMP_CWORD="2")
    assert {"--max-batch", "--max-batch-size", "--max-body-bytes"} <= set(_run(env=env).stdout.split())
    script = _run("--show-completion", "bash")
    assert script.returncode == 0 and "_FOUNDRY_LOCAL_COMPLETE" in script.stdout
