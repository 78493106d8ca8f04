"""Fast checks of the ONNX engine's model-folder and event helpers (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai")

from foundry_local_py.engines.base import Constraint, SequenceFailure, TokenOutput
from foundry_local_py.engines.onnx_genai import constraint_to_guidance, read_chat_template
from foundry_local_py.engines.onnx_genai.common import Budget, finish_outputs, scrub
from foundry_local_py.errors import ContextLengthExceededError, EngineError, ModelLoadError


def test_template_from_jinja_file_wins(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "old", "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
    }))
    spec = read_chat_template(tmp_path)
    assert spec is not None
    assert spec.source == "{{ messages[0]['content'] }}"
    assert (spec.bos_token, spec.eos_token) == ("<s>", "</s>")


def test_template_from_tokenizer_config_and_named_lists(tmp_path: Path) -> None:
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": "plain"}))
    spec = read_chat_template(tmp_path)
    assert spec is not None and spec.source == "plain" and spec.bos_token == ""
    cfg.write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]}))
    spec = read_chat_template(tmp_path)
    assert spec is not None and spec.source == "chat"


def test_no_template_and_broken_config(tmp_path: Path) -> None:
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        read_chat_template(tmp_path)
    assert str(tmp_path) not in err.value.message


def test_scrub_removes_paths() -> None:
    msg = scrub("Failed to load library: /opt/x/libonnxruntime-genai-cuda.so: cannot open shared object")
    assert "/opt" not in msg and "cannot open" in msg
    assert "C:\\Users" not in scrub("error at C:\\Users\\me\\model.onnx here")


def test_constraint_to_guidance() -> None:
    assert constraint_to_guidance(Constraint("json_object")) == ("json_schema", '{"type": "object"}')
    kind, data = constraint_to_guidance(Constraint("json_schema", {"type": "array"}))
    assert kind == "json_schema" and json.loads(data) == {"type": "array"}


def test_finish_reasons_map_to_scheduler_outputs() -> None:
    room = Budget(max_new=10, session=20, ctx_limited=False)
    tight = Budget(max_new=4, session=24, ctx_limited=True)
    (eos,) = finish_outputs("r", "EOS", room, 2)
    assert isinstance(eos, TokenOutput) and eos.end_of_generation and eos.token_id == 2
    (done,) = finish_outputs("r", "MAX_GENERATED_TOKENS", room, 2)
    assert isinstance(done, TokenOutput) and done.end_of_generation
    (ctx,) = finish_outputs("r", "MAX_SESSION_TOKENS", tight, 2)
    assert isinstance(ctx, SequenceFailure) and isinstance(ctx.error, ContextLengthExceededError)
    (failed,) = finish_outputs("r", "FAILED", room, 2)
    assert isinstance(failed, SequenceFailure) and isinstance(failed.error, EngineError)


@pytest.mark.parametrize(("kv_bytes", "kept_bytes", "reuses"), [
    (46_080, 64 << 20, True),   # SmolLM2's fp32 KV: ~1,456 tokens of budget
    (46_080, 0, False),         # --prompt-cache-mib 0
    (46_080, 4 << 20, False),   # less than one generator's smallest buffer
    (0, 64 << 20, False),       # the config does not give the KV size: no budget to keep
])
def test_prefix_reuse_is_offered_only_with_a_budget(kv_bytes: int, kept_bytes: int, reuses: bool) -> None:
    from types import SimpleNamespace

    from foundry_local_py.engines.base import GenerationRequest, SamplingParams
    from foundry_local_py.engines.onnx_genai.generators import GeneratorRunner

    owner = SimpleNamespace(kv_bytes_per_token=kv_bytes,
                            options=SimpleNamespace(max_batch=8, kept_bytes=kept_bytes))
    runner = GeneratorRunner(owner)  # type: ignore[arg-type]
    greedy = GenerationRequest("g", [1, 2, 3], 8, SamplingParams(temperature=0.0))
    sampled = GenerationRequest("s", [1, 2, 3], 8, SamplingParams(temperature=0.7))
    assert runner.reuses(greedy) is reuses
    assert runner.reuses(sampled) is False
