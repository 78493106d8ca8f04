"""engines/probe.py without a server: how a probe child's end becomes a verdict, the verdict cache,
and the static ONNX check (external data and config paths must stay inside the folder)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from foundry_local_py.engines.probe import (
    check_onnx_folder,
    file_key,
    onnx_external_locations,
    probe_model,
    run_probe,
)
from foundry_local_py.errors import ModelLoadError

PY = sys.executable


@pytest.mark.parametrize(
    ("code", "ok", "needle"),
    [
        ("pass", True, ""),
        ("import os; os.abort()", False, "crashed the runtime while loading (SIGABRT)"),
        ("import ctypes; ctypes.string_at(0)", False, "crashed the runtime while loading (SIGSEGV)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", False, "(SIGKILL)"),
        ("print('probe-error: the model file could not be loaded'); raise SystemExit(1)", False,
         "the model file could not be loaded"),
        ("print('probe-error: ValueError'); raise SystemExit(1)", False,
         "the model could not be loaded: ValueError"),
        ("print('/secret/path/x.gguf'); raise SystemExit(3)", False, "exit status 3"),
        ("import time; time.sleep(30)", False, "did not finish within 1 s"),
    ],
)
def test_how_a_child_ends_is_the_verdict(code: str, ok: bool, needle: str) -> None:
    v = run_probe([PY, "-c", code], timeout_s=1 if "sleep" in code else 60)
    assert v.ok is ok
    assert needle in v.message
    assert "/secret" not in v.message


def _settings(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(probe_models=True, probe_verdicts=tmp_path / "v.json", probe_timeout_s=30)


def _counting(tmp_path: Path, code: str) -> list[str]:
    counter = tmp_path / "runs"
    return [PY, "-c", f"open({str(counter)!r}, 'a').write('x'); {code}"]


def _runs(tmp_path: Path) -> int:
    p = tmp_path / "runs"
    return len(p.read_text()) if p.exists() else 0


def test_a_verdict_is_kept_per_file_and_a_changed_file_is_probed_again(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    s = _settings(tmp_path)
    probe_model("gguf", model, s, command=_counting(tmp_path, "pass"))
    probe_model("gguf", model, s, command=_counting(tmp_path, "pass"))
    assert _runs(tmp_path) == 1
    os.utime(model, ns=(1, 1))  # touched: another key
    probe_model("gguf", model, s, command=_counting(tmp_path, "pass"))
    assert _runs(tmp_path) == 2
    assert len(json.loads(s.probe_verdicts.read_text())) == 2


def test_a_crash_verdict_is_remembered(tmp_path: Path) -> None:
    model = tmp_path / "bad.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    s = _settings(tmp_path)
    for _ in range(3):
        with pytest.raises(ModelLoadError) as info:
            probe_model("gguf", model, s, command=_counting(tmp_path, "import os; os.abort()"))
        assert info.value.code == "model_load_failed" and "SIGABRT" in info.value.message
    assert _runs(tmp_path) == 1  # one crash, not one per request


def test_a_timeout_is_not_remembered(tmp_path: Path) -> None:
    model = tmp_path / "slow.gguf"
    model.write_bytes(b"GGUF")
    s = _settings(tmp_path)
    s.probe_timeout_s = 0.5
    for _ in range(2):
        with pytest.raises(ModelLoadError):
            probe_model("gguf", model, s, command=_counting(tmp_path, "import time; time.sleep(5)"))
    assert _runs(tmp_path) == 2


def test_probing_off(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    s.probe_models = False
    probe_model("gguf", tmp_path / "nothing.gguf", s, command=[PY, "-c", "raise SystemExit(1)"])


def test_a_folder_key_covers_every_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    k1 = file_key("onnx", tmp_path / "d")
    (tmp_path / "d" / "b").write_text("2")
    assert file_key("onnx", tmp_path / "d") != k1


# --- ONNX ----------------------------------------------------------------------------------------

def _onnx_model(locations: list[str], *, in_subgraph: bool = False) -> bytes:
    pytest.importorskip("onnx")  # the [convert] extra: only to build test models
    from onnx import TensorProto, helper

    tensors = []
    for i, loc in enumerate(locations):
        t = helper.make_tensor(f"w{i}", TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", loc), ("offset", "0"), ("length", "4")):
            e = t.external_data.add()
            e.key, e.value = key, value
        tensors.append(t)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    if in_subgraph:
        inner = helper.make_graph([helper.make_node("Identity", ["w0"], ["y"])], "inner", [], [out], tensors)
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
        graph = helper.make_graph([node], "g", [], [out], [cond])
    else:
        graph = helper.make_graph([helper.make_node("Identity", ["w0"], ["y"])], "g", [], [out], tensors)
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_external_locations_are_all_found(in_subgraph: bool) -> None:
    locs = ["a.bin", "../b.bin", "/etc/passwd"]
    assert sorted(set(onnx_external_locations(_onnx_model(locs, in_subgraph=in_subgraph)))) == sorted(locs)


def _folder(tmp_path: Path, locations: list[str], config: dict | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(_onnx_model(locations))
    config = config or {"model": {"decoder": {"filename": "model.onnx"}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("location", ["model.onnx.data", "data/w.bin", "./x/../w.bin"])
def test_external_data_inside_the_folder_is_fine(tmp_path: Path, location: str) -> None:
    check_onnx_folder(_folder(tmp_path, [location]))


@pytest.mark.parametrize(
    "location",
    ["../secret.bin", "/etc/shadow", "data/../../secret.bin", "C:\\Windows\\x", "\\\\server\\share\\x",
     "a\x00b", ""],
)
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        check_onnx_folder(_folder(tmp_path, ["ok.bin", location]))
    assert "outside its folder" in info.value.message and info.value.code == "model_load_failed"
    assert str(tmp_path) not in info.value.message


def test_genai_config_naming_a_file_outside_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, ["ok.bin"], {"model": {"decoder": {"filename": "../../other.onnx"}}})
    with pytest.raises(ModelLoadError, match="genai_config"):
        check_onnx_folder(folder)


def test_a_link_leading_outside_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, ["w.bin"])
    (tmp_path / "outside.bin").write_bytes(b"x" * 4)
    (folder / "w.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ModelLoadError, match="link"):
        check_onnx_folder(folder)


def test_garbage_onnx_is_a_clean_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path, ["ok.bin"])
    (folder / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError):
        check_onnx_folder(folder)


def test_an_unwritable_verdict_store_costs_a_probe_not_the_load(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "file").write_text("x")
    s = _settings(tmp_path)
    s.probe_verdicts = tmp_path / "file" / "below-a-file" / "v.json"  # as under a read-only root
    for _ in range(2):
        probe_model("gguf", model, s, command=_counting(tmp_path, "pass"))
    assert _runs(tmp_path) == 2


def test_verdicts_default_to_the_cache(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    s = SimpleNamespace(probe_models=True, probe_verdicts=None, probe_timeout_s=30, cache_dir=tmp_path / "c")
    probe_model("gguf", model, s, command=[PY, "-c", "pass"])
    assert json.loads((tmp_path / "c" / ".probe-verdicts.json").read_text())
