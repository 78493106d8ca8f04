"""schemathesis against the server's own OpenAPI document (issue 13): every route, generated
requests with and without the API key. Without it: 401 everywhere but /health. With it: no 5xx,
and every response with a documented schema conforms to it. A real server with the real model;
bounded in examples (``FUZZ_EXAMPLES``, default 25 per route and mode: data that fits the
schema, and data that breaks it) and in generation (``max_tokens``
capped at 8) so it runs in a minute or two. Status counts are printed (``-s``)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support.serving import SMOLLM

pytestmark = pytest.mark.slow

KEY = "sk-fuzz-0123456789abcdef"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
MAX_TOKENS = 8
SEEN: Counter[str] = Counter()
CALLS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import TEST_SERVER_ARGS
    from tests.support.serving import DRAINED_EXIT_CODES, ServerProcess

    root = tmp_path_factory.mktemp("fuzz")
    proc = ServerProcess(cache_dir=root / "cache", log_path=root / "log",
                         extra_args=[*TEST_SERVER_ARGS, "--api-key", KEY, "--n-ctx", "512"]).start()
    yield proc
    print(f"\nFUZZ responses by route and status: {dict(sorted(SEEN.items()))}")
    print(f"FUZZ total calls: {sum(SEEN.values())} ({dict(CALLS)})")
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-3000:]


def _operations() -> dict[str, Any]:
    """The server's own OpenAPI document, as built by the app (no server needed to collect)."""
    from foundry_local_py.config import Settings
    from foundry_local_py.server.app import create_app

    doc = create_app(Settings()).openapi()
    ops = (result.ok() for result in schemathesis.openapi.from_dict(doc).get_all_operations())
    return {op.label: op for op in ops}


OPERATIONS = _operations()


def _cap(case: Any) -> None:
    """Keep generation short (a hook on the generated body): a missing or large ``max_tokens``
    becomes 8; invalid values (0, -1, "x") are left for the server to refuse. A string ``model``
    becomes the real one half the time, so requests reach the engine, not only the 404."""
    body = case.body
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS):
            body[field] = MAX_TOKENS
    if isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
        body["model"] = SMOLLM


def test_the_document_is_the_served_one(fuzz_server: Any) -> None:
    served = httpx.get(fuzz_server.url("/openapi.json"), headers={"authorization": f"Bearer {KEY}"}).json()
    labels = {f"{m.upper()} {p}" for p, item in served["paths"].items() for m in item}
    assert labels == set(OPERATIONS)


# Schema-breaking data needs something to break: a body or a query parameter.
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label, op in sorted(OPERATIONS.items())
    if list(op.body) or list(op.query)
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{lb} {m.value}" for lb, m in CASES])
def test_every_route_fuzzed_with_and_without_the_key(label: str, mode: GenerationMode, fuzz_server: Any
                                                     ) -> None:
    operation = OPERATIONS[label]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        _cap(case)
        anonymous = case.call(base_url=fuzz_server.base_url, timeout=120)
        SEEN[f"{label} no-key {anonymous.status_code}"] += 1
        CALLS[mode.value] += 2
        if case.path == "/health":
            assert anonymous.status_code < 500, anonymous.text[:500]
        else:
            assert anonymous.status_code == 401, (label, anonymous.status_code, anonymous.text[:300])
        response = case.call_and_validate(
            base_url=fuzz_server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
            checks=[not_a_server_error, response_schema_conformance],
        )
        SEEN[f"{label} {response.status_code}"] += 1

    fuzz()


def test_the_fuzzing_reached_the_model(fuzz_server: Any) -> None:
    """Runs after the fuzzing (file order): the generated requests got past validation to the
    engine at least once, or the fuzz only ever tested the 4xx paths."""
    ok = sum(n for k, n in SEEN.items() if k.startswith("POST /v1/") and k.endswith(" 200"))
    if not SEEN:
        pytest.skip("run with the fuzz test")
    assert ok > 0, dict(SEEN)
    assert httpx.get(fuzz_server.url("/health")).status_code == 200
