"""The conversation workloads' summary and comparison: a system whose turns fail ends those
conversations early and does less work, so the bench must say the comparison is not like for like."""

from __future__ import annotations

import io

from rich.console import Console

from foundry_local_py.bench.load import RequestResult
from foundry_local_py.bench.run import _print_conversations
from foundry_local_py.bench.workloads import ConversationResult


def _result(ok_turns: int, failed: int) -> ConversationResult:
    res = ConversationResult("agent", conversations=2, turns=3, wall_s=2.0)
    for i in range(ok_turns):
        res.results.append(RequestResult(ok=True, start=float(i), first=i + 0.1, last=i + 0.5,
                                         text="x", tokens=10))
    for _ in range(failed):
        res.results.append(RequestResult(ok=False, start=0.0, error="HTTP 500: failed to find free space"))
    return res


def test_summary_counts_completed_turns_and_the_first_error() -> None:
    s = _result(4, 1).summary()
    assert s["turns_completed"] == 4
    assert s["turns_planned"] == 6
    assert s["errors"] == 1
    assert s["first_error"] == "HTTP 500: failed to find free space"
    assert s["aggregate_tps"] == 20.0  # 40 tokens of the completed turns / 2 s


def _printed(per_system: dict[str, list[dict[str, object]]]) -> str:
    out = io.StringIO()
    _print_conversations("agent", per_system, Console(file=out, width=400))
    return out.getvalue()


def test_a_comparison_with_different_completed_turns_is_flagged() -> None:
    text = _printed({"ours": [_result(6, 0).summary()], "peer": [_result(4, 1).summary()]})
    assert "not like for like" in text
    assert "ours 6/6" in text and "peer 4/6" in text
    assert "failed to find free space" in text


def test_a_like_for_like_comparison_is_not_flagged() -> None:
    text = _printed({"ours": [_result(6, 0).summary()], "peer": [_result(6, 0).summary()]})
    assert "not like for like" not in text
    assert "aggregate, per round: 1.00x" in text
