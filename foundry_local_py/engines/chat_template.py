"""Render chat templates taken from model files, in a sandbox with time and size caps.

GGUF and tokenizer_config templates are untrusted input (CVE-2024-34359 was remote code execution
through exactly this in llama-cpp-python). We render them with jinja2's
``ImmutableSandboxedEnvironment`` and add budgets: a deadline checked at every call and every
output chunk and every loop iteration, caps on total ``range`` items and loop iterations, a cap on
string repetition, and a cap on the size of the source and of the rendered prompt.
"""

from __future__ import annotations

import functools
import json
import operator
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequestError, ModelLoadError

MAX_TEMPLATE_CHARS = 256 * 1024
MAX_OUTPUT_CHARS = 4 * 1024 * 1024
MAX_RANGE_ITEMS = 1_000_000
MAX_LOOP_ITERATIONS = 1_000_000
_LOOP_GUARD = "_fl_loop_guard"
_CONCAT = "_fl_concat"


class TemplateBudgetExceeded(Exception):
    pass


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.range_left = MAX_RANGE_ITEMS
        self.loop_left = MAX_LOOP_ITERATIONS

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded("chat template took too long to render")


_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """Sandbox whose every call and arithmetic on sequences is metered by the render's budget."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Parse, then route every ``for`` loop's iterable through the metered iterator and
        every ``~`` concatenation through a size-checked join.

        Without this a loop whose body neither calls anything nor outputs anything (nested
        loops over a long literal, say) never reaches a budget check and runs forever, and
        ``{% set ns.s = ns.s ~ ns.s %}`` in a loop doubles a string into gigabytes.
        """
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name(_LOOP_GUARD, "load", lineno=loop.lineno), [loop.iter], [],
                                   None, None, lineno=loop.lineno)
        for concat in tree.find_all(nodes.Concat):
            concat.nodes = [nodes.Call(nodes.Name(_CONCAT, "load", lineno=concat.lineno), concat.nodes, [],
                                       None, None, lineno=concat.lineno)]
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "*":
            for seq, count in ((left, right), (right, left)):
                too_big = isinstance(seq, (str, list, tuple)) and isinstance(count, int) and (
                    len(seq) * max(count, 0) > MAX_OUTPUT_CHARS)
                if too_big:
                    raise TemplateBudgetExceeded("chat template built a too large value")
            return operator.mul(left, right)
        if operator_name == "+":
            sized = (str, list, tuple)
            if isinstance(left, sized) and isinstance(right, sized) and (
                    len(left) + len(right) > MAX_OUTPUT_CHARS):
                raise TemplateBudgetExceeded("chat template built a too large value")
            return operator.add(left, right)
        if operator_name == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateBudgetExceeded("chat template exponent too large")
            return operator.pow(left, right)
        return super().call_binop(context, operator_name, left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.check()
        if isinstance(getattr(__obj, "__self__", None), (str, bytes, list, tuple)):
            _check_sizes(args, kwargs)  # 'x'.ljust(n), 'x'.center(n), ...
        return _checked_result(super().call(__context, __obj, *args, **kwargs))


def _check_sizes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse integer arguments that could only serve to build huge values ('x'.ljust(10**10))."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT_CHARS:
            raise TemplateBudgetExceeded("chat template passed a too large argument")


def _checked_result(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_OUTPUT_CHARS:
        raise TemplateBudgetExceeded("chat template built a too large value")
    return value


def _guard_filter(func: Any) -> Any:
    """Filters are called directly by compiled templates (not through ``call``): same checks."""

    # The filtered value comes first (after the context, for pass_context filters): not checked.
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.check()
        _check_sizes(args[skip:], kwargs)
        return _checked_result(func(*args, **kwargs))

    return guarded


def _concat(*parts: Any) -> str:
    pieces = [str(p) for p in parts]
    if sum(len(p) for p in pieces) > MAX_OUTPUT_CHARS:
        raise TemplateBudgetExceeded("chat template built a too large value")
    return "".join(pieces)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=False)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled, sandboxed chat template. Thread-safe for concurrent renders."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ModelLoadError("the model's chat template is too large")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _new_env().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"the model's chat template does not parse: {exc.message}") from exc

    @property
    def mentions_tools(self) -> bool:
        return "tools" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        timeout_s: float = 2.0,
        extra: dict[str, Any] | None = None,
    ) -> str:
        budget = _Budget(timeout_s)
        token = _BUDGET.set(budget)
        variables: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            variables["tools"] = tools
        if extra:
            variables.update(extra)
        try:
            return _collect(self._template.generate(variables), budget)
        except TemplateBudgetExceeded as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        except jinja2.exceptions.SecurityError as exc:
            raise InvalidRequestError(
                "the chat template attempted an unsafe operation", param="messages"
            ) from exc
        except jinja2.exceptions.TemplateError as exc:
            # raise_exception() in templates reports what the template rejects (roles, order).
            raise InvalidRequestError(f"chat template error: {exc}", param="messages") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
                RecursionError) as exc:
            raise InvalidRequestError(
                f"chat template could not render these messages ({type(exc).__name__})",
                param="messages",
            ) from exc
        finally:
            _BUDGET.reset(token)


def _new_env() -> _BudgetedEnvironment:
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _metered_range
    env.globals[_LOOP_GUARD] = _metered_loop
    env.globals[_CONCAT] = _concat
    env.filters = {name: _guard_filter(f) for name, f in env.filters.items()}
    return env


def _collect(chunks: Iterator[str], budget: _Budget) -> str:
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise TemplateBudgetExceeded("chat template output is too large")
        budget.check()
        out.append(chunk)
    return "".join(out)


def _metered_range(*args: int) -> range:
    r = range(*args)
    budget = _BUDGET.get()
    if budget is not None:
        budget.range_left -= len(r)
        if budget.range_left < 0:
            raise TemplateBudgetExceeded("chat template loops too long")
        budget.check()
    return r


def _metered_loop(iterable: Iterable[Any]) -> Iterable[Any]:
    """Every template loop iterates through this: each item counts and checks the deadline."""
    budget = _BUDGET.get()
    if budget is None:
        return iterable
    return _metered_items(iterable, budget)


def _metered_items(iterable: Iterable[Any], budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.loop_left -= 1
        if budget.loop_left < 0:
            raise TemplateBudgetExceeded("chat template loops too long")
        budget.check()
        yield item
