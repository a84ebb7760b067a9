"""A model's prompts as the token ids its engine caches, for choosing a replica by what its KV cache holds
(:mod:`deployments.kv_routing`).

Why its own module: Serve pickles a request router's module by value to ship it to every handle, and this one holds
a process-wide lock, which cannot be pickled; imported from here it travels by reference.
"""

from __future__ import annotations

import threading
from typing import Any

from deployments.constants import KV_MATCH_CHARS

# transformers imports its classes lazily, on first use, and that is not thread-safe: a router with several kv_cache
# models loads their tokenizers in threads at once, and all but one or two of them got "cannot import name
# 'AutoTokenizer'" (their models were then placed by load alone). So one tokenizer loads at a time in a process.
_TOKENIZER_LOADING = threading.Lock()


def import_transformers() -> None:
    """transformers' first import, which holds the interpreter for seconds: a router calls this before it serves,
    so that its first tokenizer does not stall the streams it relays meanwhile."""
    with _TOKENIZER_LOADING:
        from transformers import AutoTokenizer  # noqa: F401


class PromptTokens:
    """A model's prompts as the token ids its engine caches: vLLM renders a chat with the model's chat template
    and tokenizes the text without adding special tokens; a text completion's prompt is tokenized with them."""

    def __init__(self, source: str, chat_template: str | None) -> None:
        self.source = source
        self.chat_template = chat_template
        self._tokenizer: Any = None

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def load(self) -> None:
        with _TOKENIZER_LOADING:
            from transformers import AutoTokenizer

            if self._tokenizer is None:
                self._tokenizer = AutoTokenizer.from_pretrained(self.source)

    def of(self, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids, or None when there is no text prompt to match (or it cannot be rendered here)."""
        if self._tokenizer is None or body.get("cache_salt"):
            return None
        if isinstance(body.get("messages"), list):
            messages = [_text_message(message) for message in body["messages"]]
            if any(message is None for message in messages):
                return None
            text = self._tokenizer.apply_chat_template(
                messages, tools=body.get("tools"), chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=body.get("add_generation_prompt", True),
                **(body.get("chat_template_kwargs") or {}))
            return self._start_tokens(text, add_special_tokens=False)
        if isinstance(body.get("prompt"), str):
            return self._start_tokens(body["prompt"], add_special_tokens=True)
        return None

    def _start_tokens(self, text: str, add_special_tokens: bool) -> list[int]:
        """The tokens of the text's first :data:`KV_MATCH_CHARS` characters: a prompt of megabytes would otherwise
        cost the router a second of tokenizing. The token the cut may have split is left out."""
        if len(text) <= KV_MATCH_CHARS:
            return self._tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        return self._tokenizer(text[:KV_MATCH_CHARS], add_special_tokens=add_special_tokens).input_ids[:-1]


def _text_message(message: Any) -> dict[str, Any] | None:
    """A message whose content is text (vLLM joins a list of text parts with newlines); None with any other part."""
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            return None
        message = {**message, "content": "\n".join(str(part.get("text", "")) for part in content)}
    return message
