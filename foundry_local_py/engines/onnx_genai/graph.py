"""A load-time rewrite of an ONNX GenAI decoder graph: logits for the last position only.

The model builder's decoders compute the LM head for every position of the input, so a prefill of S
tokens multiplies S rows by the vocabulary matrix although onnxruntime-genai samples from the last
row alone (og.Engine, og.Generator and our runners never read the others). For SmolLM2 (49k
vocabulary) that is ~17% of a prefill; for Gemma 3 (262k) about half.

:func:`last_position_logits` returns the graph with the LM head's input gathered at each row's last
real position (rows are right-padded: ``sum(attention_mask) - 1`` of the whole sequence, counted in
this run's input) and its output broadcast back to ``[batch, sequence, vocab]`` (onnxruntime-
genai's static batch decoder checks that shape; a broadcast of one row costs a memory write, not a
matrix product). The model's weights and files are untouched: the engine hands the rewritten graph
to ``og.Config.add_model_data`` and onnxruntime reads the external weights from the folder as
before. The engine does this on the CPU only, where it is measured and tested. Anything unexpected
(no ``logits`` output of rank 3, no ``input_ids`` of rank 2, no MatMul-like head) returns None and
the model loads as it is.

The last row's logits are the same product as before, row for row, on every kernel that computes a
row independently of the rows beside it (what :func:`~.lanes.probe_batch_invariance` checks at
load).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEAD_OPS = frozenset({"MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul"})
"""Ops that can be the LM head (the product with the vocabulary matrix)."""

PASS_THROUGH_OPS = frozenset({"Cast", "Mul", "Div", "Add", "Tanh"})
"""Per-element ops between the head and the logits output (a cast to fp32, a soft cap)."""

_PREFIX = "/foundry_local/last_position"


def _P(name: str) -> str:
    return f"{_PREFIX}/{name}"


def _last_position_index(helper: Any, hidden: str) -> list[Any]:
    """Nodes computing ``index`` [batch, 1, hidden]: each row's last real position in this run's
    input. Rows are right-padded (GroupQueryAttention's layout): a row's last real token is at
    ``sum(attention_mask) - 1`` of the whole sequence, and this run's input holds its last
    ``sequence`` positions, so the index is ``sum - 1 - (total - sequence)``, clamped to the
    input (a decode step's one position)."""
    mk = helper.make_node
    return [
        mk("ReduceSum", ["attention_mask", _P("one")], [_P("real")], keepdims=0, name=_P("Real")),
        mk("Cast", [_P("real")], [_P("real64")], to=7, name=_P("Real64")),
        mk("Shape", ["attention_mask"], [_P("total")], start=1, end=2, name=_P("Total")),
        mk("Shape", ["input_ids"], [_P("ids_shape")], name=_P("IdsShape")),
        mk("Shape", ["input_ids"], [_P("sequence")], start=1, end=2, name=_P("Sequence")),
        mk("Sub", [_P("sequence"), _P("total")], [_P("new_minus_total")], name=_P("NewMinusTotal")),
        mk("Add", [_P("real64"), _P("new_minus_total")], [_P("end")], name=_P("End")),
        mk("Sub", [_P("end"), _P("one")], [_P("raw")], name=_P("Raw")),
        mk("Sub", [_P("sequence"), _P("one")], [_P("last")], name=_P("Last")),
        mk("Max", [_P("raw"), _P("zero_scalar")], [_P("low")], name=_P("Low")),
        mk("Min", [_P("low"), _P("last")], [_P("clamped")], name=_P("Clamped")),
        mk("Reshape", [_P("clamped"), _P("index_shape")], [_P("index_1")], name=_P("IndexShape")),
        mk("Shape", [hidden], [_P("batch")], start=0, end=1, name=_P("Batch")),
        mk("Shape", [hidden], [_P("width")], start=2, name=_P("Width")),
        mk("Concat", [_P("batch"), _P("one"), _P("width")], [_P("gather_shape")], axis=0,
           name=_P("GatherShape")),
        mk("Expand", [_P("index_1"), _P("gather_shape")], [_P("index")], name=_P("Index")),
    ]


def last_position_logits(model_file: Path, logits_name: str = "logits") -> bytes | None:
    """The decoder graph of ``model_file`` computing the LM head for the last position only
    (serialized, weights left external), or None when the graph is not one this knows."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:  # the [onnx] extra brings it; without it the model loads unchanged
        return None
    import numpy as np

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # an unreadable graph is for onnxruntime to report
        log.debug("could not read %s for the last-position rewrite: %s", model_file, exc)
        return None
    graph = model.graph
    if any(n.name.startswith(_PREFIX) for n in graph.node):
        return None  # already rewritten
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:  # Shape's start / end attributes
        return None
    outputs = {o.name: o for o in graph.output}
    inputs = {i.name: i for i in graph.input}
    logits = outputs.get(logits_name)
    input_ids = inputs.get("input_ids")
    if logits is None or input_ids is None:
        return None
    if len(logits.type.tensor_type.shape.dim) != 3 or len(input_ids.type.tensor_type.shape.dim) != 2:
        return None
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    constants = {n.output[0] for n in graph.node if n.op_type == "Constant"}

    head = producer.get(logits_name)
    while head is not None and head.op_type in PASS_THROUGH_OPS:
        # follow the one input that is not a constant (a Mul by a scalar, a Cast)
        moving = [x for x in head.input if x and x not in initializers and x not in constants]
        if len(moving) != 1:
            return None
        head = producer.get(moving[0])
    if head is None or head.op_type not in HEAD_OPS or not head.input:
        return None
    if sum(1 for node in graph.node if head.input[0] in node.input) != 1:
        return None  # the hidden state feeds something else too: leave the graph alone

    hidden = head.input[0]
    if "attention_mask" not in inputs or len(inputs["attention_mask"].type.tensor_type.shape.dim) != 2:
        return None
    position = list(graph.node).index(head)
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), _P("one")),
        numpy_helper.from_array(np.array(0, dtype=np.int64), _P("zero_scalar")),
        numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), _P("index_shape")),
    ])
    graph.node.insert(position, helper.make_node(
        "GatherElements", [hidden, _P("index")], [_P("hidden")], axis=1, name=_P("Gather")))
    for node in reversed(_last_position_index(helper, hidden)):
        graph.node.insert(position, node)
    last = _P("hidden")
    head.input[0] = last
    final = producer[logits_name]
    full = _P("logits")
    for i, name in enumerate(final.output):
        if name == logits_name:
            final.output[i] = full
    graph.node.extend([
        helper.make_node("Shape", [full], [_P("vocab")], start=2, name=_P("VocabShape")),
        helper.make_node("Concat", [_P("ids_shape"), _P("vocab")], [_P("out_shape")], axis=0,
                         name=_P("OutShape")),
        helper.make_node("Expand", [full, _P("out_shape")], [logits_name], name=_P("Expand")),
    ])
    return bytes(model.SerializeToString())
