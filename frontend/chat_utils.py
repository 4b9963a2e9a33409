"""Renders chat conversations into prompts for `LLM.chat`: the tokenizer's chat template (or
the one given) turned into text, then into token ids without adding special tokens, since the
template already writes BOS where the model wants one (vLLM once doubled it)."""

from __future__ import annotations

from typing import Any

from ember.chat_content import format_messages, resolve_content_format
from ember.workers.mistral_tokenizer import is_mistral_tokenizer


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value


def normalize_conversations(messages: Any) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them, as a list of them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("messages must be a non-empty list of message dicts, or a list of them")
    conversations = [messages] if all(isinstance(m, dict) for m in messages) else messages
    for index, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise TypeError(f"messages[{index}] must be a non-empty list of message dicts")
        for message in conversation:
            if not _is_message(message):
                raise TypeError(
                    f"messages[{index}]: every message must be a dict with a 'role', got "
                    f"{message!r:.80}"
                )
    return [list(c) for c in conversations]


def render_chat_prompts(
    tokenizer: Any,
    messages: Any,
    *,
    chat_template: str | None = None,
    chat_template_content_format: str = "auto",
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
    tokenize: bool = True,
) -> list[dict]:
    """One prompt dict (`prompt`, and `prompt_token_ids` unless tokenize=False) per
    conversation. Message content is given to the template as a string or as OpenAI-style
    parts (`chat_template_content_format`, see `ember.chat_content`)."""
    if tokenizer is None:
        raise ValueError("chat() needs a tokenizer (skip_tokenizer_init=True was given)")
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "add_generation_prompt and continue_final_message cannot both be True: the "
            "generation prompt would open a new message after the one to continue"
        )
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise TypeError("chat_template_kwargs must be a dict")
    if is_mistral_tokenizer(tokenizer):
        return _render_mistral_prompts(
            tokenizer, messages, chat_template, continue_final_message, tools
        )
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this model's tokenizer has no chat template; pass chat_template= (a Jinja "
            "template string) to chat()"
        )
    content_format = resolve_content_format(chat_template_content_format, template)
    prompts = []
    for index, conversation in enumerate(normalize_conversations(messages)):
        text = tokenizer.apply_chat_template(
            format_messages(conversation, content_format, index),
            chat_template=template,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
        if not tokenize:
            prompts.append({"prompt": text})
            continue
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append({"prompt": text, "prompt_token_ids": list(token_ids)})
    return prompts


def _render_mistral_prompts(
    tokenizer: Any,
    messages: Any,
    chat_template: str | None,
    continue_final_message: bool,
    tools: list[dict] | None,
) -> list[dict]:
    """Conversations rendered to token ids by mistral_common (tokenizer_mode="mistral"), as
    vLLM's `MistralRenderer` does: the messages as given (string or OpenAI-style content), no
    Jinja template, no text to tokenize again (so, as in vLLM, the output's prompt text is
    None), and mistral_common's refusals of a conversation raised as ValueError."""
    if chat_template is not None:
        raise ValueError(
            "chat_template cannot be used with tokenizer_mode='mistral': mistral_common "
            "renders the conversation itself"
        )
    prompts = []
    for index, conversation in enumerate(normalize_conversations(messages)):
        try:
            token_ids = tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                continue_final_message=continue_final_message,
                tokenize=True,
                return_dict=False,
            )
        except Exception as exc:  # mistral_common refuses with asserts and its own errors
            raise ValueError(f"conversation {index}: mistral_common refused it: {exc}") from exc
        prompts.append({"prompt_token_ids": [int(token_id) for token_id in token_ids]})
    return prompts


class ChatMixin:
    """`LLM.chat` and `LLM.enqueue_chat`, mixed into `LLM` (they use its tokenizer, and
    `generate` / `enqueue`)."""

    def chat(
        self,
        messages: Any,
        sampling_params: Any = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: int | list[int] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list:
        """Generate replies to one conversation (a list of `{"role", "content"}` dicts) or a
        list of them, rendered with `chat_template`, else `LLM(chat_template=...)`, else the
        tokenizer's template. As vLLM: `sampling_params=None` means
        `get_default_sampling_params()`, and the rendered text is tokenized with
        add_special_tokens=False unless `tokenization_kwargs` say otherwise."""
        prompts, tokenization_kwargs = self._render_chat(
            messages,
            chat_template,
            chat_template_content_format,
            add_generation_prompt,
            continue_final_message,
            tools,
            chat_template_kwargs,
            tokenization_kwargs,
        )
        return self.generate(
            prompts,
            sampling_params,
            use_tqdm=use_tqdm,
            lora_request=lora_request,
            priority=priority,
            tokenization_kwargs=tokenization_kwargs,
            mm_processor_kwargs=mm_processor_kwargs,
        )

    def enqueue_chat(
        self,
        messages: Any,
        sampling_params: Any = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: int | list[int] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """vLLM's: `chat`'s rendering, then `enqueue`; returns the request ids, whose outputs
        `wait_for_completion()` gathers."""
        prompts, tokenization_kwargs = self._render_chat(
            messages,
            chat_template,
            chat_template_content_format,
            add_generation_prompt,
            continue_final_message,
            tools,
            chat_template_kwargs,
            tokenization_kwargs,
        )
        return self.enqueue(
            prompts,
            sampling_params,
            lora_request=lora_request,
            priority=priority,
            use_tqdm=use_tqdm,
            tokenization_kwargs=tokenization_kwargs,
            mm_processor_kwargs=mm_processor_kwargs,
        )

    def _render_chat(
        self,
        messages: Any,
        chat_template: str | None,
        chat_template_content_format: str,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: list[dict] | None,
        chat_template_kwargs: dict | None,
        tokenization_kwargs: dict[str, Any] | None,
    ) -> tuple[list[dict], dict[str, Any]]:
        """The conversations as prompt dicts, and the tokenization_kwargs to encode them with."""
        prompts = render_chat_prompts(
            self.tokenizer,
            messages,
            chat_template=self.chat_template if chat_template is None else chat_template,
            chat_template_content_format=chat_template_content_format,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            tokenize=False,
        )
        if tokenization_kwargs is not None and not isinstance(tokenization_kwargs, dict):
            raise TypeError(
                f"tokenization_kwargs must be a dict, got {type(tokenization_kwargs).__name__}"
            )
        return prompts, {"add_special_tokens": False, **(tokenization_kwargs or {})}
