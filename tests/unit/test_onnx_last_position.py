"""The load-time rewrite that computes an ONNX decoder's logits for the last position only.

A tiny decoder-shaped graph (embedding -> per-position mixing with the attention mask -> LM head
-> soft cap) is run by onnxruntime before and after the rewrite: every row's logits at its last
real position must be bitwise the original's, for right-padded prefills, a continuation after a
cached prefix, and decode steps. Graphs the rewrite does not know load unchanged (None).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from foundry_local_py.engines.onnx_genai.graph import last_position_logits  # noqa: E402

VOCAB_IN, HIDDEN, VOCAB = 50, 8, 40


def _decoder(path: Path, *, opset: int = 17, head_op: str = "MatMul", logits_rank: int = 3) -> Path:
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB_IN, HIDDEN)).astype(np.float32), "embed"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "lm_head"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "cap"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["emb"]),
        # a position-dependent term that uses the mask, so the hidden state of each position differs
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["msum"], keepdims=1),
        helper.make_node("Cast", ["msum"], ["msumf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["msumf", "axis1"], ["msum3"]),
        helper.make_node("Mul", ["emb", "msum3"], ["hidden"]),
        helper.make_node(head_op, ["hidden", "lm_head"], ["raw"]),
        helper.make_node("Mul", ["raw", "cap"], ["logits"]),
    ]
    dims = ["batch", "sequence", VOCAB][:logits_rank]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(model: bytes | str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    return out


@pytest.fixture()
def decoder(tmp_path: Path) -> Path:
    return _decoder(tmp_path / "model.onnx")


@pytest.mark.parametrize("case", ["right-padded prefill", "continuation", "decode"])
def test_each_rows_last_position_keeps_its_logits(decoder: Path, case: str) -> None:
    rewritten = last_position_logits(decoder)
    assert rewritten is not None
    if case == "right-padded prefill":  # rows of 3 and 5 real tokens, padded to 5
        ids = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]], dtype=np.int64)
        mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
        last = [2, 4]
    elif case == "continuation":  # 4 tokens cached, 3 new
        ids = np.array([[11, 12, 13]], dtype=np.int64)
        mask = np.ones((1, 7), dtype=np.int64)
        last = [2]
    else:  # one new token per row, rows of different lengths so far
        ids = np.array([[14], [15]], dtype=np.int64)
        mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=np.int64)
        last = [0, 0]
    before = _run(str(decoder), ids, mask)
    after = _run(rewritten, ids, mask)
    assert after.shape == before.shape  # onnxruntime-genai's static batch checks it
    for row, pos in enumerate(last):
        assert np.array_equal(after[row, pos], before[row, pos])
        # every position holds the row's last logits (the head ran once per row)
        assert np.array_equal(after[row], np.broadcast_to(before[row, pos], after[row].shape))
    if case == "right-padded prefill":
        assert not np.array_equal(after[0, 0], before[0, 0])  # the other positions were not computed


def test_graphs_it_does_not_know_load_unchanged(tmp_path: Path) -> None:
    assert last_position_logits(_decoder(tmp_path / "old.onnx", opset=13)) is None
    assert last_position_logits(_decoder(tmp_path / "flat.onnx", logits_rank=2)) is None
    assert last_position_logits(tmp_path / "missing.onnx") is None
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    assert last_position_logits(tmp_path / "junk.onnx") is None
    once = tmp_path / "once.onnx"
    rewritten = last_position_logits(_decoder(once))
    assert rewritten is not None
    once.write_bytes(rewritten)
    assert last_position_logits(once) is None  # never twice
