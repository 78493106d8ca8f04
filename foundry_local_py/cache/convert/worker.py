"""The conversion worker: runs one conversion job in its own process.

``python -m foundry_local_py.cache.convert.worker`` reads a :class:`Job` (JSON) on stdin, writes
JSON lines on stdout (``progress`` events, then one ``result`` or ``error``) and sends everything
else (the builder's prints, llama.cpp's logs, tracebacks) to stderr, which the parent keeps in a
log file. A separate process keeps torch and transformers out of the server's memory, lets the
parent kill a conversion, and keeps the builder's import-path changes contained.

:func:`run_job` is the same work in-process, for tests and debugging.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ...errors import ConversionError, FoundryError
from . import fidelity

log = logging.getLogger(__name__)

CHECKPOINT_SANITY_TOP1 = 0.80
"""The float32 checkpoint read from a GGUF must agree this well with llama.cpp running the GGUF.

Measured: 0.96 (SmolLM2, Gemma 3). Lower means the GGUF reader got the model wrong (a tensor
layout or a config field), and a conversion would faithfully reproduce a broken model.
"""

Report = Callable[[str, str], None]


class Job(BaseModel):
    method: Literal["onnx-builder", "gguf-quantize"]
    base_path: str
    out_dir: str
    work_dir: str
    precision: str
    execution_provider: str = "cpu"
    entry: str | None = Field(None, description="GGUF output file name (gguf-quantize).")
    threshold: float = fidelity.DEFAULT_THRESHOLD
    model_name: str = "model"
    n_threads: int | None = None
    checkpoint_dir: str | None = Field(
        None, description="Reuse (or keep) the float32 checkpoint of a GGUF source here."
    )


class JobResult(BaseModel):
    fidelity: dict[str, Any]
    details: dict[str, Any] = Field(default_factory=dict)


def run_job(job: Job, report: Report) -> JobResult:
    if job.method == "onnx-builder":
        return _onnx_builder(job, report)
    return _gguf_quantize(job, report)


def _onnx_builder(job: Job, report: Report) -> JobResult:
    from . import onnx_builder

    base, out, work = Path(job.base_path), Path(job.out_dir), Path(job.work_dir)
    if job.execution_provider == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            raise ConversionError(
                "building a CUDA variant needs onnxruntime-genai-cuda and a CUDA GPU (to validate it)"
            )
    kind = fidelity.model_kind(base)
    details: dict[str, Any] = {"base_kind": kind}
    if kind == "onnx":
        raise ConversionError("an ONNX model cannot be rebuilt by the model builder; use its source")
    timings: dict[str, float] = {}
    details["timings_s"] = timings
    started = time.monotonic()
    if kind == "gguf":
        checkpoint = Path(job.checkpoint_dir) if job.checkpoint_dir else work / "hf-checkpoint"
        if _complete(checkpoint):
            report("convert", "Reusing the float32 checkpoint of the GGUF")
        else:
            report("convert", "Reading the GGUF into a float32 checkpoint (transformers)")
            _write_checkpoint(base, checkpoint)
        details["architecture"] = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    else:
        checkpoint = base
    timings["checkpoint"] = _lap(started)
    report("convert", f"Building the ONNX model: {job.precision}, {job.execution_provider} (model builder)")
    started = time.monotonic()
    onnx_builder.build_onnx(
        checkpoint,
        out,
        precision=job.precision,
        execution_provider=job.execution_provider,
        work_dir=work,
        model_name=job.model_name,
    )
    shutil.rmtree(work / "builder-cache", ignore_errors=True)
    timings["build"] = _lap(started)

    report("verify", "Measuring fidelity against the source on the reference text")
    started = time.monotonic()
    ids = fidelity.tokenize(base, fidelity.reference_text())
    reference = fidelity.score(checkpoint, ids, n_threads=job.n_threads)
    runtime = None
    if kind == "gguf":
        runtime = fidelity.score(base, ids, n_threads=job.n_threads)
        check = fidelity.compare(runtime, reference, threshold=CHECKPOINT_SANITY_TOP1)
        details["checkpoint_vs_source_top1"] = check.top1_agreement
        if check.degraded:
            raise ConversionError(
                "the checkpoint read from the GGUF does not reproduce the GGUF's predictions "
                f"(top-1 agreement {check.top1_agreement:.2%}); the conversion was stopped"
            )
    if kind == "gguf":
        # llama.cpp adds BOS only where the model asks for it; onnxruntime-genai's tokenizer does
        # not add it for a converted Gemma, so the engine has to (recorded for it here).
        bos = json.loads((out / "genai_config.json").read_text())["model"].get("bos_token_id")
        details["add_bos_token"] = ids[0] in (bos if isinstance(bos, list) else [bos])
        _set_add_bos_token(out, bool(details["add_bos_token"]))
    converted = fidelity.score(out, ids, n_threads=job.n_threads)
    if converted.n_vocab != reference.n_vocab:
        raise ConversionError("the converted model's vocabulary differs from its source's")
    result = fidelity.compare(reference, converted, threshold=job.threshold)
    result.reference = (
        "source weights in float32 (transformers)" if kind == "gguf" else "source (transformers)"
    )
    if runtime is not None:
        result.runtime_top1_agreement = fidelity.compare(
            runtime, converted, threshold=job.threshold
        ).top1_agreement
    timings["fidelity"] = _lap(started)
    return JobResult(fidelity=result.model_dump(), details=details)


_COMPLETE = ".complete"


def _complete(checkpoint: Path) -> bool:
    return (checkpoint / _COMPLETE).is_file() and (checkpoint / "config.json").is_file()


def _write_checkpoint(gguf_path: Path, checkpoint: Path) -> None:
    """Write the checkpoint beside its final name, then rename it (another build may share it)."""
    from . import onnx_builder

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(f".{checkpoint.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        onnx_builder.gguf_to_hf(gguf_path, tmp)
        (tmp / _COMPLETE).write_text(gguf_path.name, encoding="utf-8")
        if checkpoint.exists() and not _complete(checkpoint):
            shutil.rmtree(checkpoint, ignore_errors=True)
        try:
            os.replace(tmp, checkpoint)
        except OSError:
            if not _complete(checkpoint):  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _set_add_bos_token(out: Path, value: bool) -> None:
    """Record in the model folder (the Hugging Face field) whether prompts start with BOS, so an
    engine can honour it where onnxruntime-genai's tokenizer does not."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["add_bos_token"] = value
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _lap(started: float) -> float:
    return round(time.monotonic() - started, 1)


def _gguf_quantize(job: Job, report: Report) -> JobResult:
    from . import gguf_quantize

    base, out = Path(job.base_path), Path(job.out_dir)
    if fidelity.model_kind(base) != "gguf":
        raise ConversionError("GGUF re-quantization needs a GGUF source")
    target = out / (job.entry or "model.gguf")
    report("convert", f"Re-quantizing to {job.precision} (llama.cpp)")
    started = time.monotonic()
    gguf_quantize.quantize(base, target, precision=job.precision, n_threads=job.n_threads)
    timings = {"build": _lap(started)}
    report("verify", "Measuring fidelity against the source on the reference text")
    started = time.monotonic()
    ids = fidelity.tokenize(base, fidelity.reference_text())
    source_scores = fidelity.score(base, ids, n_threads=job.n_threads)
    converted = fidelity.score(target, ids, n_threads=job.n_threads)
    if converted.n_vocab != source_scores.n_vocab:
        raise ConversionError("the converted model's vocabulary differs from its source's")
    result = fidelity.compare(source_scores, converted, threshold=job.threshold)
    result.reference = "source (llama.cpp)"
    timings["fidelity"] = _lap(started)
    return JobResult(fidelity=result.model_dump(), details={"timings_s": timings})


def _exit_with_parent() -> None:
    """A killed parent cannot kill us (we run in our own session): stop when it is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main() -> int:
    _exit_with_parent()
    # Everything written to fd 1 from here on (the builder's prints, C libraries) goes to stderr;
    # the events go to a private copy of the original stdout.
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    started = time.monotonic()

    def report(stage: str, message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s {stage}] {message}", file=sys.stderr, flush=True)
        emit({"event": "progress", "stage": stage, "message": message})

    try:
        job = Job.model_validate_json(sys.stdin.read())
        result = run_job(job, report)
    except FoundryError as exc:
        traceback.print_exc()
        emit({"event": "error", "message": exc.message})
        return 2
    except Exception as exc:
        traceback.print_exc()
        emit({"event": "error", "message": f"unexpected {type(exc).__name__} in the conversion"})
        return 3
    emit({"event": "result", **result.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
