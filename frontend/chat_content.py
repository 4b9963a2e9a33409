"""Chat message content as a chat template expects it (vLLM's `chat_template_content_format`):
"string" joins OpenAI-style text parts into one string, "openai" keeps a list of
`{"type": "text", "text": ...}` parts, and "auto" picks by reading the template's Jinja syntax
tree. Also `load_chat_template` for `LLM(chat_template=...)`. Used by `ember.chat_utils`."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

CONTENT_FORMATS = ("auto", "string", "openai")
# vLLM's text part types and the key that holds each one's text.
_TEXT_PART_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# Parts vLLM parses as multi-modal data (or tool references), which ember has no use for.
_OTHER_PART_TYPES = (
    "image_url",
    "input_image",
    "image_embeds",
    "image_pil",
    "audio_url",
    "input_audio",
    "audio_embeds",
    "video_url",
    "video_embeds",
    "prompt_embeds",
    "tool_reference",
)
_JINJA_CHARS = "{}\n"


def load_chat_template(chat_template: str | os.PathLike | None) -> str | None:
    """vLLM's `load_chat_template`: the text of the file `chat_template` names, else the string
    itself as a Jinja template; a string with no Jinja character ({, } or a newline) that names
    no file is taken for a mistyped path and refused."""
    if chat_template is None:
        return None
    if isinstance(chat_template, os.PathLike):
        with open(chat_template) as f:
            return f.read()
    if not isinstance(chat_template, str):
        raise TypeError(
            "chat_template must be a Jinja template string or a file path, got "
            f"{type(chat_template).__name__}"
        )
    try:
        with open(chat_template) as f:
            return f.read()
    except OSError as exc:
        if not any(char in chat_template for char in _JINJA_CHARS):
            raise ValueError(
                f"chat_template {chat_template!r} looks like a file path, but it could not be "
                f"opened ({exc.strerror})"
            ) from exc
    return chat_template


def resolve_content_format(content_format: str, chat_template: str) -> str:
    """ "string" or "openai": `content_format` checked, "auto" resolved from the template."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(
            f"chat_template_content_format must be one of {CONTENT_FORMATS}, got {content_format!r}"
        )
    if content_format != "auto":
        return content_format
    detected = detect_content_format(chat_template)
    logger.debug("Detected the chat template content format to be %r", detected)
    return detected


def detect_content_format(chat_template: str) -> str:
    """vLLM's rule: "openai" when the template loops over a message's content (`{% for part in
    message['content'] %}`, directly, through a variable named `content`, or through a macro
    argument), else "string"; a template that does not parse counts as "string"."""
    tree = _parse_template(chat_template)
    if tree is None:
        return "string"
    return "openai" if _loops_over_content(tree) else "string"


def format_messages(
    conversation: list[dict], content_format: str, conversation_index: int = 0
) -> list[dict]:
    """Each message with its content in `content_format` ("string" or "openai"); the other
    keys of a message are passed on as they are."""
    formatted = []
    for message_index, message in enumerate(conversation):
        where = f"messages[{conversation_index}][{message_index}]"
        content = _format_content(message.get("content"), content_format, where)
        if message["role"] == "tool" and isinstance(content, list):
            # vLLM: tool results given as text parts reach the template as one string
            content = "\n".join(part["text"] for part in content)
        formatted.append({**message, "content": content})
    return formatted


def _format_content(content: Any, content_format: str, where: str) -> str | list[dict]:
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, (list, tuple)):
        parts = list(content)
    else:
        raise TypeError(
            f"{where}: content must be a string or a list of content parts, got "
            f"{type(content).__name__}"
        )
    texts: list[str] = []
    openai_parts: list[dict] = []
    for part_index, part in enumerate(parts):
        part_where = f"{where}.content[{part_index}]"
        if isinstance(part, str):
            texts.append(part)
            openai_parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            raise TypeError(f"{part_where} must be a string or a dict, got {type(part).__name__}")
        text = _part_text(part, part_where)
        if text is None:
            continue
        texts.append(text)
        extra = {key: value for key, value in part.items() if key not in ("type", "text")}
        extra.pop(_TEXT_PART_KEYS[part["type"]], None)
        openai_parts.append({"type": "text", "text": text, **extra})
    return openai_parts if content_format == "openai" else "\n".join(texts)


def _part_text(part: dict, where: str) -> str | None:
    """The text of one content part; None for a text part without text (vLLM skips it)."""
    part_type = part.get("type")
    if part_type in _TEXT_PART_KEYS:
        text = part.get(_TEXT_PART_KEYS[part_type])
        if text is None:
            logger.warning("Skipping content part %s of type %r without text", where, part_type)
            return None
        if not isinstance(text, str):
            raise TypeError(f"{where}: {_TEXT_PART_KEYS[part_type]} must be a str")
        return text
    if part_type in _OTHER_PART_TYPES or any(key in part for key in _OTHER_PART_TYPES):
        raise NotImplementedError(
            f"{where}: content parts of type {part_type!r} are not supported (ember's models "
            "take text only)"
        )
    raise ValueError(
        f"{where}: unsupported content part type {part_type!r}; text parts have type "
        f"{sorted(_TEXT_PART_KEYS)}"
    )


# ---- "auto": does the template iterate over a message's content? -----------------------------


def _parse_template(chat_template: str) -> Any:
    """The template's Jinja syntax tree, parsed in transformers' chat-template environment (its
    extensions included), or None when it does not parse."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(chat_template).environment.parse(chat_template)
    except Exception:  # any failure means: not a template we can read
        logger.debug("chat template did not parse; content format 'string'", exc_info=True)
        return None


def _reads(node: Any, name: str, key: str | None = None) -> bool:
    """Whether `node` reads variable `name` (or its item / attribute `key`), possibly through
    filters, tests or a slice: `messages`, `messages[1:]`, `message['content'] | list`."""
    from jinja2 import nodes

    def wraps(candidate: Any) -> bool:
        if isinstance(candidate, (nodes.Filter, nodes.Test)):
            return candidate.node is not None
        return isinstance(candidate, nodes.Getitem) and isinstance(candidate.arg, nodes.Slice)

    while wraps(node):
        node = node.node

    def is_name(candidate: Any) -> bool:
        return (
            isinstance(candidate, nodes.Name) and candidate.ctx == "load" and candidate.name == name
        )

    if key is None:
        return is_name(node)
    if isinstance(node, nodes.Getitem):
        return is_name(node.node) and isinstance(node.arg, nodes.Const) and node.arg.value == key
    if isinstance(node, nodes.Getattr):
        return is_name(node.node) and node.attr == key
    return False


def _aliases(tree: Any, name: str) -> set[str]:
    """`name` and every variable assigned from it, transitively (`{% set msgs = messages %}`)."""
    from jinja2 import nodes

    names, pending = {name}, [name]
    while pending:
        current = pending.pop()
        for assign in tree.find_all(nodes.Assign):
            target = assign.target
            if (
                isinstance(target, nodes.Name)
                and target.name not in names
                and _reads(assign.node, current)
            ):
                names.add(target.name)
                pending.append(target.name)
    return names


def _loops_over_content(tree: Any) -> bool:
    from jinja2 import nodes

    message_lists = _aliases(tree, "messages")
    message_names = {
        loop.target.name
        for loop in tree.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name)
        and any(_reads(loop.iter, name) for name in message_lists)
    }

    def reads_content(node: Any) -> bool:
        return any(_reads(node, name, "content") for name in message_names)

    loops_in_macros: set[int] = set()
    macro_content_loops: set[int] = set()
    for macro in tree.find_all(nodes.Macro):
        params = [arg.name for arg in macro.args]
        content_params = set()
        for call in tree.find_all(nodes.Call):
            if not (isinstance(call.node, nodes.Name) and call.node.name == macro.name):
                continue
            for position, arg in enumerate(call.args[: len(params)]):
                if reads_content(arg):
                    content_params.add(params[position])
            for keyword in call.kwargs:
                if keyword.key in params and reads_content(keyword.value):
                    content_params.add(keyword.key)
        for loop in macro.find_all(nodes.For):
            loops_in_macros.add(id(loop))
            if isinstance(loop.iter, nodes.Name) and loop.iter.name in content_params:
                macro_content_loops.add(id(loop))

    for loop in tree.find_all(nodes.For):
        if reads_content(loop.iter) or id(loop) in macro_content_loops:
            return True
        if (
            id(loop) not in loops_in_macros
            and isinstance(loop.iter, nodes.Name)
            and loop.iter.name == "content"
        ):
            return True
    return False
