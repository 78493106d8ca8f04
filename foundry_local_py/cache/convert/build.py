"""Build a converted variant into the cache: lock, convert in a worker, verify, install, manifest.

The output lands like a download does: the worker writes into the variant's staging folder
(``<root>/.staging/<publisher>/<variant>/``, same filesystem), the files are inventoried (size,
sha256), the output folder is renamed into place in one step, and ``manifest.json`` (source,
recipe, tool versions, sizes, fidelity) is written LAST. A killed or failed conversion leaves at
most a staging folder, which is not a variant; the next build (or ``cache remove``) clears it. The
variant's download lock is held throughout, so a second process waits and then finds the result,
and ``cache remove`` cannot pull the folder from under a build.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...errors import ConversionError, ModelNotFoundError
from ..catalog import CatalogModel, ConvertSource, Variant
from ..manifest import Fidelity, Manifest, ManifestFile, write_manifest
from ..progress import Progress, ProgressCallback
from ..store import ModelStore, sha256_file
from . import fidelity
from .worker import Job, JobResult

log = logging.getLogger(__name__)

ONNX_DEPENDENCIES = MappingProxyType({
    "torch": "torch",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "gguf": "gguf",
    "onnx": "onnx",
    "onnx_ir": "onnx-ir",
    "onnxruntime_genai": "onnxruntime-genai",
})
ONNX_TOOLS = (
    "onnxruntime-genai", "onnxruntime", "transformers", "torch", "accelerate", "gguf", "onnx", "onnx-ir",
)
COMMON_TOOLS = ("foundry-local-py", "llama-cpp-python", "numpy")


def missing_dependencies(method: str) -> list[str]:
    """pip names of the packages a conversion method needs that are not installed."""
    if method != "onnx-builder":
        return []
    return [pip for module, pip in ONNX_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]


def tool_versions(method: str) -> dict[str, str]:
    names = COMMON_TOOLS + (ONNX_TOOLS if method == "onnx-builder" else ())
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def conversion_log_path(store: ModelStore, variant: Variant) -> Path:
    """Where the last conversion of ``variant`` wrote its log (for the CLI; never shown to clients)."""
    return store.root / ".logs" / f"convert-{variant.name}.log"


def check_recipe(variant: Variant, base_variant: Variant) -> ConvertSource:
    source = variant.source
    if not isinstance(source, ConvertSource):
        raise ConversionError(f"'{variant.name}' is not a converted variant")
    if source.method == "onnx-builder":
        if variant.format != "onnx":
            raise ConversionError(f"'{variant.name}': the model builder produces ONNX, not {variant.format}")
        if base_variant.format == "onnx":
            raise ConversionError(f"'{variant.name}': an ONNX model cannot be rebuilt by the model builder")
    elif variant.format != "gguf" or base_variant.format != "gguf":
        raise ConversionError(f"'{variant.name}': GGUF re-quantization turns a GGUF into a GGUF")
    return source


def build_variant(  # noqa: PLR0917 - the signature acquire.ensure_variant calls
    store: ModelStore,
    model: CatalogModel,
    variant: Variant,
    base_model: CatalogModel,
    base_variant: Variant,
    base_path: Path,
    *,
    progress: ProgressCallback | None = None,
    force: bool = False,
    threshold: float = fidelity.DEFAULT_THRESHOLD,
    n_threads: int | None = None,
    checkpoint_cache: Path | None = None,
) -> Path:
    """Convert ``base_path`` (the resolved base variant) into ``variant``; return the variant's path.

    ``progress`` is an ``acquire.ProgressCallback``. Without ``force`` an already-built variant is
    returned as it is. Two processes building the same variant take turns on its lock; the second
    finds the first one's result. ``checkpoint_cache``: a folder where the float32 checkpoint of a
    GGUF source is kept and reused by later ONNX builds from the same file (by sha256); without it
    the checkpoint is temporary.
    """
    source = check_recipe(variant, base_variant)
    missing = missing_dependencies(source.method)
    if missing:
        raise ConversionError(
            "converting to ONNX needs the [convert] extra: pip install 'foundry-local-py[convert]' "
            f"(missing: {', '.join(missing)})"
        )
    report = _reporter(progress, variant)
    target = store.variant_dir(model, variant)
    work = store.staging_dir(model, variant)
    with store.download_lock(variant):
        if not force:
            with contextlib.suppress(ModelNotFoundError):
                return store.resolve(model, variant)
        shutil.rmtree(work, ignore_errors=True)  # what a killed build left
        work.mkdir(parents=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            started = time.monotonic()
            out = work / "out"
            out.mkdir()
            entry = f"{variant.name}.gguf" if source.method == "gguf-quantize" else None
            base_facts = _base_facts(base_path)
            checkpoint_dir = None
            if checkpoint_cache is not None and "base_sha256" in base_facts:
                checkpoint_dir = str(checkpoint_cache / f"{base_facts['base_sha256'][:16]}-float32")
            job = Job(
                method=source.method,
                base_path=str(base_path),
                out_dir=str(out),
                work_dir=str(work),
                precision=source.precision,
                execution_provider=source.execution_provider,
                entry=entry,
                threshold=threshold,
                model_name=variant.name,
                n_threads=n_threads,
                checkpoint_dir=checkpoint_dir,
            )
            result = run_worker(job, report, log_path=conversion_log_path(store, variant))
            result_fidelity = Fidelity.model_validate(result.fidelity)
            report("verify", "Recording file sizes and checksums")
            files = _inventory(out)
            if entry is not None and not (out / entry).is_file():
                raise ConversionError("the conversion produced no model file")
            if entry is None and not (out / "genai_config.json").is_file():
                raise ConversionError("the conversion produced no genai_config.json")
            manifest = Manifest(
                variant_id=variant.id,
                alias=model.alias,
                kind="convert",
                entry=entry,
                files=files,
                source={
                    "base": base_variant.id,
                    "base_alias": base_model.alias,
                    "base_format": base_variant.format,
                    **base_facts,
                    "method": source.method,
                    "precision": source.precision,
                    "execution_provider": source.execution_provider,
                    "duration_s": round(time.monotonic() - started, 1),
                    **result.details,
                },
                tool_versions=tool_versions(source.method),
                fidelity=result_fidelity,
            )
            _install(out, target, work)
            write_manifest(target, manifest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report("done", describe_fidelity(result_fidelity), manifest.total_size, manifest.total_size)
    return store.resolve(model, variant)


def describe_fidelity(fid: Fidelity) -> str:
    text = (
        f"top-1 agreement {fid.top1_agreement:.1%} (threshold {fid.threshold:.0%}), "
        f"perplexity {fid.perplexity_source:.2f} -> {fid.perplexity_converted:.2f} "
        f"({fid.perplexity_delta_pct:+.2f}%) over {fid.n_tokens} tokens"
    )
    return text + (": DEGRADED" if fid.degraded else "")


# --- worker process ------------------------------------------------------------------------------


Reporter = Callable[..., None]


def run_worker(job: Job, report: Reporter, *, log_path: Path) -> JobResult:
    """Run ``job`` in ``python -m foundry_local_py.cache.convert.worker``; forward its progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")
    result: JobResult | None = None
    error: str | None = None
    with log_path.open("w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "foundry_local_py.cache.convert.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(job.model_dump_json())
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                kind = event.get("event")
                if kind == "progress":
                    report(str(event.get("stage", "convert")), str(event.get("message", "")))
                elif kind == "result":
                    result = JobResult.model_validate({k: v for k, v in event.items() if k != "event"})
                elif kind == "error":
                    error = str(event.get("message", "the conversion failed"))
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if error is not None:
        log.error("conversion failed: %s (log: %s)", error, log_path)
        raise ConversionError(error)
    if rc != 0 or result is None:
        reason = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        log.error("conversion worker %s (log: %s)", reason, log_path)
        raise ConversionError(f"the conversion worker {reason}")
    return result


# --- cache folder handling -------------------------------------------------------------------------


def _inventory(folder: Path) -> list[ManifestFile]:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        files.append(ManifestFile(path=relative, size=path.stat().st_size, sha256=sha256_file(path)))
    if not files:
        raise ConversionError("the conversion produced no files")
    return files


def _install(out: Path, target: Path, work: Path) -> None:
    """Rename ``out`` to ``target`` in one step; a previous folder there goes into ``work``."""
    previous = work / "previous"
    if target.exists():
        os.replace(target, previous)
    try:
        os.replace(out, target)
    except OSError:
        if previous.exists() and not target.exists():
            os.replace(previous, target)
        raise


def _base_facts(base_path: Path) -> dict[str, Any]:
    if base_path.is_file():
        return {
            "base_file": base_path.name,
            "base_size": base_path.stat().st_size,
            "base_sha256": sha256_file(base_path),
        }
    return {}


def _reporter(progress: ProgressCallback | None, variant: Variant) -> Reporter:
    def report(stage: str, message: str, done: int = 0, total: int | None = None) -> None:
        log.info("%s: %s", variant.id, message)
        if progress is not None:
            progress(Progress(variant.id, stage, done_bytes=done, total_bytes=total, message=message))

    return report
