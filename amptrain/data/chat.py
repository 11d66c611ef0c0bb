"""Conversations as tokens: a tokenizer's chat template, or the plain one, split into turns.

`segments` renders a conversation and says which pieces are scored (the assistant turns). With
a chat template (Jinja, as Hugging Face tokenizers ship it in `tokenizer_config.json`) the
conversation is rendered turn by turn: the text up to an assistant turn, rendered with the
generation prompt, must be where the rendering with that turn begins, and what the turn adds
(its content and the template's end of turn) is the completion. A template that renders earlier
turns differently once later ones follow (some drop earlier reasoning) cannot be split so, and
its conversations are reported as unusable rather than scored wrongly.

Without a template, a plain one is used:

    system: You are terse.
    user: What is 2 + 2?
    assistant: 4<eos>

one line a turn, `role: content`; the completion is the assistant's content and the
end-of-sequence token, and `assistant: ` is the generation prompt.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(Exception):
    """A conversation the chat template cannot render turn by turn."""


def check_messages(messages: Any) -> str | None:
    """Why `messages` is not a usable conversation (a reason to count), or None."""
    if not isinstance(messages, list) or not messages:
        return "without a list of messages"
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return "with a turn that is not {'role', 'content': text}"
        if turn.get("role") not in ROLES:
            return f"with a role outside {list(ROLES)}"
    if not any(t["role"] == "assistant" and t["content"].strip() for t in messages):
        return "without a non-empty assistant turn"
    return None


def bos(tokenizer: Any) -> list[int]:
    """The tokenizer's beginning-of-sequence id as a list (empty where it has none)."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    """`(ids, scored)` pieces of a conversation; assistant turns are scored.

    Raises:
        TemplateError: If the chat template does not render the turns as prefixes.
    """
    if tokenizer.chat_template is None:
        return _plain(messages, tokenizer)
    pieces: list[tuple[list[int], bool]] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not before.startswith(done) or not upto.startswith(before):
            raise TemplateError("whose chat template renders earlier turns differently once "
                                "later ones follow (not split into turns)")  # fmt: skip
        pieces.append((tokenizer.encode(before[len(done) :], special=False), False))
        pieces.append((tokenizer.encode(upto[len(before) :], special=False), True))
        done = upto
    rest = render(tokenizer, messages)[len(done) :]
    if rest:
        pieces.append((tokenizer.encode(rest, special=False), False))
    return pieces


def _plain(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], bool]]:
    pieces: list[tuple[list[int], bool]] = []
    for turn in messages:
        if turn["role"] == "assistant":
            pieces.append((tokenizer.encode("assistant: ", special=False), False))
            content = tokenizer.encode(turn["content"], special=False)
            pieces.append((content + [tokenizer.eos_id], True))
            pieces.append((tokenizer.encode("\n", special=False), False))
        else:
            pieces.append((tokenizer.encode(f"{turn['role']}: {turn['content']}\n",
                                            special=False), False))  # fmt: skip
    return pieces


def prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    """A user's prompt as the start of an assistant turn, for `generate --chat`."""
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template is None:
        return tokenizer.encode(f"user: {prompt}\nassistant: ", special=False)
    return tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True),
                            special=False)  # fmt: skip


def render(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    """The chat template applied as Hugging Face applies it (a sandboxed Jinja environment).

    Raises:
        TemplateError: If the template does not compile or refuses the conversation.
    """
    try:
        template = _compiled(tokenizer.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=getattr(tokenizer, "bos_token", None) or "",
                               eos_token=getattr(tokenizer, "eos_token", None) or "")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote
        raise TemplateError(
            f"that the chat template refuses ({type(exc).__name__}: {exc})"
        ) from None


_TEMPLATES: dict[str, Any] = {}


def _compiled(source: str) -> Any:
    """The template compiled as transformers compiles chat templates.

    The same environment: sandboxed, `trim_blocks`, `lstrip_blocks`, loop controls
    (`{% break %}`), `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII;
    the `{% generation %}` markers some templates carry (for assistant masks) render their body.
    """
    if source not in _TEMPLATES:
        import datetime

        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.Scope(body, lineno=lineno)

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[Generation, "jinja2.ext.loopcontrols"],
        )  # fmt: skip
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
