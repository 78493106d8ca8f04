"""engines.chat_template: templates from model files are untrusted. Introspection is refused; loops,
string blow-ups and recursion are stopped quickly with a 400-class error; normal templates render."""

from __future__ import annotations

import pytest

from foundry_local_py.engines.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from foundry_local_py.errors import InvalidRequestError, ModelLoadError

MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]

# Reaching for Python internals: refused, either with a 400 or by rendering nothing.
INTROSPECTION = {
    "class-mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "func-globals": "{{ raise_exception.__globals__ }}",
    "builtins": "{{ self.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "format-attr": "{{ '{0.__class__}'.format(messages) }}",
    "attr-filter": "{{ messages|attr('__class__') }}",
    "code": "{{ strftime_now.__code__.co_consts }}",
}

# Must fail with a 400-class error, and quickly (pytest-timeout guards against a hang).
HOSTILE = {
    "mutate": "{{ messages.append({'role': 'x'}) }}{{ messages|length }}",
    "range-huge": "{% for i in range(100000000) %}x{% endfor %}",
    "range-nested": "{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}",
    "loops-no-output": "{% for a in 'x' * 3000 %}{% for b in 'x' * 3000 %}{% for c in 'x' * 3000 %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "list-repeat-loops": "{% for a in messages * 3000000 %}{% for b in messages * 3000000 %}{% endfor %}"
    "{% endfor %}",
    "str-repeat": "{{ 'x' * 100000000 }}",
    "concat-doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "plus-doubling": "{% set ns = namespace(s=['ab']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "ljust": "{{ 'x'.ljust(30000000000)|length }}",
    "center-filter": "{{ 'x'|center(30000000000)|length }}",
    "indent-filter": "{{ 'a\\nb'|indent(30000000000)|length }}",
    "pow": "{{ 10 ** 100000000 }}",
    "output-huge": "{% for i in range(900000) %}xxxxxxxxxx{% endfor %}",
    "zero-division": "{{ 1 / 0 }}",
    "macro-recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "raise": "{{ raise_exception('Conversation roles must alternate') }}",
}


@pytest.mark.parametrize("name", list(INTROSPECTION))
def test_introspection_is_refused(name: str) -> None:
    template = ChatTemplate(INTROSPECTION[name])
    try:
        out = template.render([dict(m) for m in MSGS])
    except InvalidRequestError as err:
        assert err.status == 400
        out = err.message
    for leak in ("<class", "<function", "<module", "uid=", "root:", "__", "code object", "builtins"):
        assert leak not in out, out


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_are_stopped(name: str) -> None:
    template = ChatTemplate(HOSTILE[name], bos_token="<s>", eos_token="</s>")
    with pytest.raises(InvalidRequestError) as info:
        template.render([dict(m) for m in MSGS], timeout_s=2.0)
    err = info.value
    assert err.status == 400 and err.param == "messages"
    assert "<class" not in err.message and "uid=" not in err.message and "root:" not in err.message


def test_raise_exception_message_reaches_the_client() -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        ChatTemplate(HOSTILE["raise"]).render(MSGS)


@pytest.mark.timeout(20)
def test_deadline_stops_slow_rendering() -> None:
    # Every step is allowed, the whole is too slow: the deadline ends it.
    slow = "{% for i in range(900000) %}{{ messages|map(attribute='role')|join(',') }}{% endfor %}"
    with pytest.raises(InvalidRequestError):
        ChatTemplate(slow).render(MSGS * 50, timeout_s=0.2)


def test_template_size_and_syntax_are_checked_at_load() -> None:
    with pytest.raises(ModelLoadError):
        ChatTemplate("x" * (MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(ModelLoadError):
        ChatTemplate("{% for %}")


SMOL_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_ordinary_templates_render() -> None:
    out = ChatTemplate(SMOL_LIKE).render([{"role": "user", "content": "hi"}])
    assert out == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_features_still_work() -> None:
    src = (
        "{{ bos_token }}{% for m in messages %}{{ loop.index }}/{{ loop.length }}"
        "{% if loop.last %}L{% endif %}{{ loop.cycle('a', 'b') }}{{ m.role|upper }}"
        "{% for k, v in m.items() if k == 'content' %}={{ v|trim }}{% else %}-{% endfor %}|{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
        "{{ tools|tojson if tools else '' }}{{ 'x' * 3 }}{{ 2 ** 10 }}{{ [1] + [2] }}{{ 'a' ~ 1 }}"
        "{% for i in range(3) %}{{ i }}{% endfor %}{{ eos_token }}"
    )
    out = ChatTemplate(src, bos_token="<s>", eos_token="</s>").render(
        [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"}],
        tools=[{"type": "function", "function": {"name": "f"}}],
    )
    assert out == (
        '<s>1/2aUSER=a|2/2LbASSISTANT=b|2[{"type": "function", "function": {"name": "f"}}]'
        "xxx1024[1, 2]a1012</s>"
    )


def test_large_numbers_that_build_nothing_are_fine() -> None:
    src = "{% set ns = namespace(limit=99999999) %}{{ ns.limit }} {{ 10 ** 12 }} {{ 'ab'.ljust(4, '-') }}"
    assert ChatTemplate(src).render(MSGS) == "99999999 1000000000000 ab--"


def test_messages_are_not_mutated() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError):
        ChatTemplate(HOSTILE["mutate"]).render(msgs)
    assert msgs == [{"role": "user", "content": "hi"}]
