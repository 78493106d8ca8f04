"""Conversation workloads for the benchmark: what prefix reuse decides.

- **multi-turn**: ``conversations`` chats in parallel, each ``turns`` turns long; every turn
  resends the whole conversation so far (a ~150-token system prompt, the earlier questions and
  the answers the server gave) plus a new question.
- **agent**: ``conversations`` agent loops in parallel: a system prompt describing tools, a task,
  then turns where the server's reply is followed by a tool result (a JSON blob of ~80 tokens)
  and the loop asks again: the prompt grows by the reply and the tool result every turn.

A failed turn ends its conversation (the next turn would need its reply), so a system with
errors does less work, on shorter prompts: the summary counts completed turns, and the bench
flags a comparison where the counts differ.

Temperature 0, streamed (time to first token and turn latency per turn), output tokens counted
with the model's tokenizer as the other levels. Aggregate = output tokens of all turns / wall.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .load import RequestResult, _one, _url

SYSTEM = (
    "You are a patient, knowledgeable assistant for a small public library. You answer questions "
    "from visitors about books, authors, reading habits, opening hours and library services. Keep "
    "answers short, friendly and concrete: two or three sentences at most, no lists, no headings. "
    "If you are unsure, say so and suggest asking a librarian at the front desk. Never invent "
    "book titles, never promise services the library does not offer, and always be polite. The "
    "library is open from nine to six on weekdays and from ten to four on Saturdays; it is closed "
    "on Sundays and public holidays. Visitors may borrow up to eight books for three weeks."
)
QUESTIONS = (
    "What is a good first novel for someone who rarely reads?",
    "How long can I keep the books I borrow?",
    "Can you suggest something similar but shorter?",
    "Is the library open this Saturday afternoon?",
    "How do I find books about gardening?",
    "What should I read next after that?",
    "Can my child get a library card too?",
    "Thanks! Any last tip for reading more often?",
)
AGENT_SYSTEM = (
    "You are an agent that completes tasks by calling tools. Available tools: search(query) returns "
    "web results as JSON; read(url) returns a page's text; calc(expression) evaluates arithmetic. "
    "To call a tool, answer with one line: CALL tool(argument). After each tool result, decide the "
    "next call, or answer FINAL: followed by the answer. Be brief and never repeat a call."
)
AGENT_TASKS = (
    "Find the population of the largest city in Canada and divide it by 1000.",
    "Find when the Eiffel Tower was finished and how old it is in 2026.",
    "Find the boiling point of water in Fahrenheit and convert it to Kelvin.",
    "Find the height of Mount Everest in metres and express it in feet.",
)


def _tool_result(conv: int, turn: int) -> str:
    return json.dumps({"tool": "search", "status": "ok", "results": [
        {"title": f"Result {conv}.{turn}.{i}", "url": f"https://example.org/{conv}/{turn}/{i}",
         "snippet": f"Snippet {i} for turn {turn}: figures, dates and a short summary of the page."}
        for i in range(3)]})


@dataclass
class ConversationResult:
    name: str
    conversations: int
    turns: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        tokens = sum(r.tokens for r in ok)
        ttft = sorted(r.ttft for r in ok if r.ttft is not None)
        latency = sorted((r.last or r.start) - r.start for r in ok)

        def q(values: list[float], p: float) -> float | None:
            if not values:
                return None
            return round(values[min(len(values) - 1, round(p * (len(values) - 1)))] * 1000, 1)

        return {
            "workload": self.name, "conversations": self.conversations, "turns": self.turns,
            "requests": len(self.results), "errors": len(self.results) - len(ok),
            "turns_completed": len(ok), "turns_planned": self.conversations * self.turns,
            "first_error": next((r.error for r in self.results if not r.ok), None),
            "output_tokens": tokens, "wall_s": round(self.wall_s, 3),
            "aggregate_tps": round(tokens / self.wall_s, 1) if self.wall_s > 0 else 0.0,
            "ttft_p50_ms": q(ttft, 0.5), "ttft_p95_ms": q(ttft, 0.95),
            "turn_p50_ms": q(latency, 0.5), "turn_p95_ms": q(latency, 0.95),
            "turn_mean_ms": round(statistics.mean(latency) * 1000, 1) if latency else None,
        }


async def run_conversations(
    base_url: str, model: str, *, kind: str, conversations: int, turns: int, max_tokens: int,
    count_tokens: Callable[[str], int], api_key: str | None = None,
) -> ConversationResult:
    """``kind``: 'multi-turn' or 'agent' (module doc)."""
    url = _url(base_url, "chat")
    limits = httpx.Limits(max_connections=conversations + 2, max_keepalive_connections=conversations + 2)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def conversation(c: int) -> None:
            if kind == "agent":
                messages: list[dict[str, str]] = [
                    {"role": "system", "content": AGENT_SYSTEM},
                    {"role": "user", "content": AGENT_TASKS[c % len(AGENT_TASKS)]}]
            else:
                messages = [{"role": "system", "content": SYSTEM}]
            for t in range(turns):
                if kind != "agent":
                    messages.append({"role": "user", "content": QUESTIONS[(c + t) % len(QUESTIONS)]})
                res = await _one(client, url, model, "", max_tokens, api_key=api_key, messages=messages)
                results.append(res)
                if not res.ok:
                    return
                messages.append({"role": "assistant", "content": res.text})
                if kind == "agent":
                    messages.append({"role": "user", "content": f"Tool result: {_tool_result(c, t)}"})

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
        wall = time.perf_counter() - t0
    for r in results:
        r.tokens = count_tokens(r.text) if r.text else 0
    return ConversationResult(kind, conversations, turns, wall, results)
