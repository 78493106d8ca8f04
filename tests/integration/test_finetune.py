"""Real LoRA training of SmolLM2-135M on CPU, exported to GGUF and run by llama.cpp.

One tiny adapter is trained per session (6 steps, rank 8, 8 short examples that all open with a
fixed greeting; ~15 s to load the base + ~20-40 s to train on 2 cores), exported, then loaded on
the Q4_1 base with llama-cpp-python's low-level API (``llama_adapter_lora_init`` /
``llama_set_adapters_lora`` on a context). Checked:

- at temperature 0 the adapter's answers carry the trained greeting and the base's do not, and
  unsetting the adapter gives back the base's exact tokens;
- the GGUF LoRA reproduces the PEFT model: greedy tokens of PEFT in transformers (float32,
  dequantized base) and of llama.cpp + adapter agree over the trained phrase, and the change the
  adapter makes to the next-token logits points the same way in both runtimes. That last check is
  repeated with the adapter cut down to its q_proj/k_proj tensors, where a missing or wrong RoPE
  row permutation of lora_b scrambles the effect (measured: cosine ~0.3-0.7 instead of > 0.95).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from foundry_local_py.cache.catalog import Catalog  # noqa: E402
from foundry_local_py.cache.store import ModelStore  # noqa: E402
from foundry_local_py.finetune.base import resolve_base  # noqa: E402
from foundry_local_py.finetune.data import parse_chat_jsonl  # noqa: E402
from foundry_local_py.finetune.export import peft_to_gguf  # noqa: E402
from foundry_local_py.finetune.train import TrainConfig, TrainResult, train_lora  # noqa: E402
from tests.support.finetune_data import GREETING, train_jsonl  # noqa: E402
from tests.support.llama_lora import LlamaLora  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.finetune]

PROMPTS = ["Where is my parcel?", "What is the capital of Italy?", "How do I change my password?"]
CONFIG = TrainConfig(rank=8, alpha=16, max_steps=6, epochs=10, batch_size=2, learning_rate=5e-3, seed=0,
                     threads=2)


@dataclass
class Trained:
    result: TrainResult
    gguf: Path
    base: Path
    export: dict
    seconds: float


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("finetune")
    examples = parse_chat_jsonl(train_jsonl())
    base = resolve_base(ModelStore(root / "cache"), Catalog.load(), "smollm2-135m")
    started = time.monotonic()
    result = train_lora(base.path, examples, root / "peft", CONFIG, base_name=base.alias)
    export = peft_to_gguf(result.peft_dir, root / "acme.gguf", base_gguf=base.path)
    seconds = time.monotonic() - started
    print(f"\ntrained {result.steps} steps: load {result.load_seconds:.1f}s, "
          f"train {result.train_seconds:.1f}s, "
          f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}; total with export {seconds:.1f}s")
    return Trained(result=result, gguf=root / "acme.gguf", base=base.path, export=export, seconds=seconds)


@pytest.fixture(scope="module")
def llama(trained: Trained):
    runtime = LlamaLora(trained.base, n_threads=2)
    yield runtime
    runtime.close()


def _prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0][len(ids):].tolist()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_training_lowers_the_loss_and_export_covers_every_adapted_layer(trained: Trained):
    result = trained.result
    assert result.steps == 6 and len(result.losses) == 6
    assert result.final_loss < result.losses[0] * 0.7, result.losses
    assert (result.peft_dir / "adapter_config.json").is_file()
    assert json.loads((result.peft_dir / "training.json").read_text())["training"]["rank"] == 8
    assert trained.export["architecture"] == "llama" and trained.export["rank"] == 8
    assert trained.export["n_layers"] == 30 and len(trained.export["target_tensors"]) == 120
    assert trained.export["rope_permuted"]


def test_adapter_answers_in_the_trained_direction_and_unsetting_it_restores_the_base(
    trained: Trained, llama: LlamaLora
):
    tokenizer = trained.result.tokenizer
    adapter = llama.load_adapter(trained.gguf)
    llama.use(None)
    base = {p: llama.greedy(_prompt_ids(tokenizer, p), 16) for p in PROMPTS}
    llama.use(adapter)
    tuned = {p: llama.greedy(_prompt_ids(tokenizer, p), 16) for p in PROMPTS}
    llama.use(None)
    again = {p: llama.greedy(_prompt_ids(tokenizer, p), 16) for p in PROMPTS}
    for p in PROMPTS:
        base_text, tuned_text = tokenizer.decode(base[p]), tokenizer.decode(tuned[p])
        assert tuned_text.startswith(GREETING), (p, tuned_text)
        assert "Ahoy" not in base_text and "Acme" not in base_text, (p, base_text)
        assert again[p] == base[p]


def test_exported_lora_reproduces_the_peft_model(trained: Trained, llama: LlamaLora, tmp_path: Path):
    model, tokenizer = trained.result.model, trained.result.tokenizer
    adapter = llama.load_adapter(trained.gguf)
    greeting_len = len(tokenizer(GREETING, add_special_tokens=False)["input_ids"])
    for p in PROMPTS:
        ids = _prompt_ids(tokenizer, p)
        llama.use(adapter)
        ll_tokens = llama.greedy(ids, greeting_len + 1)
        hf_tokens = _hf_greedy(model, ids, greeting_len + 1)
        assert ll_tokens[:greeting_len] == hf_tokens[:greeting_len], (tokenizer.decode(ll_tokens),
                                                                      tokenizer.decode(hf_tokens))
    cosines = _logit_delta_cosines(model, llama, adapter, [_prompt_ids(tokenizer, p) for p in PROMPTS])
    assert min(cosines) > 0.9, cosines

    # The same with only the q/k tensors: the part the RoPE row permutation is about.
    qk_dir = tmp_path / "qk"
    _keep_modules(trained.result.peft_dir, qk_dir, ("q_proj", "k_proj"))
    peft_to_gguf(qk_dir, tmp_path / "qk.gguf", base_gguf=trained.base)
    qk_adapter = llama.load_adapter(tmp_path / "qk.gguf")
    saved = _silence_modules(model, ("v_proj", "o_proj"))
    try:
        prompts = [_prompt_ids(tokenizer, p) for p in PROMPTS]
        qk_cosines = _logit_delta_cosines(model, llama, qk_adapter, prompts)
    finally:
        for weight, value in saved:
            weight.data.copy_(value)
    print(f"\nlogit-delta cosine, full adapter {cosines}, q/k only {qk_cosines}")
    assert min(qk_cosines) > 0.9, qk_cosines


def _logit_delta_cosines(model, llama: LlamaLora, adapter, prompts: list[list[int]]) -> list[float]:
    """cos(adapter logits - base logits) between transformers+PEFT and llama.cpp+GGUF LoRA."""
    out = []
    for ids in prompts:
        hf_tuned = _hf_logits(model, ids)
        with model.disable_adapter():
            hf_base = _hf_logits(model, ids)
        llama.use(None)
        ll_base = llama.logits(ids)
        llama.use(adapter)
        ll_tuned = llama.logits(ids)
        delta = hf_tuned - hf_base
        assert np.linalg.norm(delta) > 1.0  # the adapter changes something measurable
        out.append(round(_cos(delta, ll_tuned - ll_base), 4))
    llama.use(None)
    return out


def _keep_modules(src: Path, dst: Path, modules: tuple[str, ...]) -> None:
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if any(f".{m}." in k for m in modules)}
    assert kept and len(kept) < len(tensors)
    save_file(kept, str(dst / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = list(modules)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    shutil.copy(src / "training.json", dst / "training.json")


def _silence_modules(model, modules: tuple[str, ...]) -> list:
    """Zero lora_B of these modules in the PEFT model (in place); returns what to restore."""
    saved = []
    for name, param in model.named_parameters():
        if "lora_B" in name and any(f".{m}." in name for m in modules):
            saved.append((param, param.detach().clone()))
            param.data.zero_()
    assert saved
    return saved
