"""Driving an engine's BatchRunner directly, as the scheduler would, in engine-level tests."""

from __future__ import annotations

from typing import Any

from foundry_local_py.engines.base import GenerationRequest, TokenOutput


def drive_alone(runner: Any, request: GenerationRequest) -> tuple[list[TokenOutput], bool, int]:
    """Add ``request`` alone to ``runner`` and step it to its end, enforcing ``max_tokens`` as the
    scheduler does; then remove it. Returns its token outputs before the end, True when it ended by
    end-of-generation, and the prompt tokens the runner reused (``add``'s result)."""
    cached = runner.add(request)
    outputs: list[TokenOutput] = []
    ended = False
    try:
        while not ended and len(outputs) < request.max_tokens:
            for out in runner.step():
                assert out.request_id == request.request_id
                assert isinstance(out, TokenOutput), out
                if out.end_of_generation:
                    ended = True
                    break
                outputs.append(out)
                if len(outputs) >= request.max_tokens:
                    break
    finally:
        runner.remove(request.request_id)
    return outputs, ended, cached
