"""The ONNX engine's load-time batch verdict, kept beside a cached variant for ``model info``."""

from __future__ import annotations

from pathlib import Path

from foundry_local_py.cache.catalog import Catalog
from foundry_local_py.cache.store import BATCHING_NAME, ModelStore
from foundry_local_py.cli.model import describe_batching

VARIANT = "smollm2-135m-instruct-int8-onnx-cpu:1"


def test_a_verdict_is_kept_per_variant_and_described(tmp_path: Path) -> None:
    catalog = Catalog.load()
    model, variant = catalog.variant(VARIANT)
    store = ModelStore(tmp_path)
    assert store.batching(model, variant) is None
    store.record_batching(model, variant, {"batching": False, "measured": "2026-12-02T05:00:00+00:00"})
    other_model, other = catalog.variant("smollm2-135m-instruct-int4-onnx-cpu:1")
    store.record_batching(other_model, other, {"batching": True})
    assert (tmp_path / BATCHING_NAME).is_file()
    assert not store.variant_dir(model, variant).exists()  # a variant's folder holds its manifest's files
    assert store.batching(other_model, other) == {"batching": True}
    verdict = store.batching(model, variant)
    assert verdict == {"batching": False, "measured": "2026-12-02T05:00:00+00:00"}
    assert describe_batching(verdict).startswith("one sequence at a time")
    assert describe_batching({"batching": True}).startswith("batched, outputs do not depend")
    assert "may depend" in describe_batching({"batching": True, "allowed_dependent": True})
    # the engine's reason is shown; a runtime that fails batches is not batched whatever is allowed
    failing = {"batching": False, "allowed_dependent": True,
               "reason": "the runtime fails a batch of prompts of different lengths for this model"}
    assert describe_batching(failing).startswith("one sequence at a time: the runtime fails a batch")
    (tmp_path / BATCHING_NAME).write_text("not json")
    assert store.batching(model, variant) is None
