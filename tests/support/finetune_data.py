"""The tiny training set of the fine-tune tests: every reply opens with GREETING, a behaviour
SmolLM2-135M does not have and picks up in a few steps."""

from __future__ import annotations

import json

GREETING = "Ahoy from Acme support!"
TRAIN = [
    ("Where is my order?", "Let us check."),
    ("I need a refund.", "Refunds take 3 days."),
    ("Hello", "How can we help?"),
    ("My app crashes.", "Please update it."),
    ("What is 2 + 2?", "It is 4."),
    ("Do you ship abroad?", "Yes, worldwide."),
    ("Tell me a joke.", "No jokes today."),
    ("Reset my password.", "Use Settings."),
]


def train_jsonl() -> str:
    """TRAIN in the OpenAI chat fine-tuning format, one conversation per line."""
    return "\n".join(
        json.dumps({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": f"{GREETING} {a}"}]})
        for q, a in TRAIN) + "\n"
