"""examples/: our rewrites of Foundry Local's Python samples, each run as a user runs it
(``python examples/<name>.py``) against the real SmolLM2 model, output checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"

pytestmark = pytest.mark.slow


def run_example(name: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "FOUNDRY_LOCAL_CACHE": str(tmp_path / "cache"),
                "FOUNDRY_LOCAL_N_THREADS": "1"})
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_chat(tmp_path: Path):
    out = run_example("chat", tmp_path)
    assert "Downloading model: 100.00%" in out and "Model loaded and ready." in out
    answer = out.split("Assistant:", 1)[1].lower()
    assert sum(c in answer for c in ("red", "blue", "green", "yellow")) >= 2, out
    assert re.search(r"Tokens: \d+ prompt, \d+ completion", out)
    assert out.rstrip().endswith("Model unloaded.")


def test_streaming_chat(tmp_path: Path):
    out = run_example("streaming_chat", tmp_path)
    assert "CPUExecutionProvider" in out and "100.0%" in out  # execution providers reported
    answer = out.split("Assistant:", 1)[1].split("Model unloaded.")[0]
    assert "golden" in answer.lower() and len(answer.split()) > 20, out


def test_tool_calling(tmp_path: Path):
    out = run_example("tool_calling", tmp_path)
    assert re.search(r"Tool call: (get_weather|calculate)\(\{", out), out
    assert out.split("Assistant:", 1)[1].strip()  # a final answer after the tool results


def test_embeddings(tmp_path: Path):
    out = run_example("embeddings", tmp_path)
    assert "Dimensions: 576" in out and "Number of embeddings: 3" in out
    assert out.count("Dimensions: 576") == 4


def test_web_server_and_openai_client(tmp_path: Path):
    out = run_example("web_server", tmp_path)
    assert re.search(r"Serving on http://127\.0\.0\.1:\d+/v1", out)
    answer = out.split("/v1\n", 1)[1]
    assert "golden" in answer.lower() and len(answer.split()) > 20, out


def test_examples_run_from_a_clone_with_any_python(tmp_path: Path):
    """Without foundry_local_py importable, an example re-runs itself with ./scripts/serve's
    .venv (or, when there is none, says what to do)."""
    script = tmp_path / "example.py"  # an example in miniature: the bootstrap, then the import
    script.write_text(f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\nimport _bootstrap\n"
                      "import foundry_local_py\nprint('imported', sys.executable)\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-S", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    if venv.exists():
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("imported ") and ".venv" in done.stdout, done.stdout
    else:
        assert done.returncode == 1 and "run ./scripts/serve once" in done.stderr
