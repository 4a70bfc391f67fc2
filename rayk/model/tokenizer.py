"""Text in and out: a model's tokenizer with its special tokens and chat template, and
incremental detokenization.

``TextTokenizer`` wraps a ``tokenizers.Tokenizer`` (from tokenizer.json or rebuilt from GGUF
metadata): ``encode`` gives token ids, ``decode`` text, and ``apply_chat_template`` renders
conversations with the model's Jinja template the way transformers' ``apply_chat_template``
does (a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``).

``IncrementalDetokenizer`` turns a growing list of generated ids into text one token at a time.
It decodes a short window of recent ids and emits only what the window adds, holding text back
while it ends in an incomplete UTF-8 sequence, so a character split over several byte tokens
(emoji, CJK) comes out whole, and the concatenated pieces equal decoding everything at once.

Text is bounded before the Rust tokenizer sees it (an oversized string makes it abort the whole
process): at most ``MAX_CHARS_PER_TOKEN`` characters per token of the caller's budget (a request's
``max_model_len``), and never more than ``MAX_TEXT_CHARS``. A chat template renders in a child
process under hard limits of memory and time (``rayk.model.template_sandbox``), its output bounded
in length the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from rayk.model.template_sandbox import MAX_TEXT_CHARS, render

MAX_CHARS_PER_TOKEN = 32
"""Characters of text allowed per token of a budget. Generous: English text averages about 4
characters per token; only text with long runs that merge into single tokens (``'A' * 1000``)
goes past 32, and that is refused before tokenizing rather than tokenized at any cost."""
_REPLACEMENT = "\ufffd"
_WINDOW = 6  # ids of context kept before the unread ones: enough for byte-level merges to settle


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None, chat_template: str | None):
        self.backend = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text``; a ValueError, before tokenizing, if it is longer than
        ``max_tokens`` could hold (``text_limit``)."""
        limit = text_limit(max_tokens)
        if len(text) > limit:
            raise ValueError(f"text of {len(text)} characters exceeds {limit} ({_limit_reason(max_tokens)}); refused before tokenizing")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def apply_chat_template(
        self, conversation: Sequence[dict], add_generation_prompt: bool = True, tokenize: bool = False, max_tokens: int | None = None
    ):
        """The conversation rendered by the model's template (text, or its ids with ``tokenize``).

        The rendering (in ``template_sandbox``'s child process) is stopped with a ValueError once it
        exceeds ``text_limit(max_tokens)`` characters, ``template_sandbox.TEMPLATE_RENDER_SECONDS`` or the child's
        memory; the template's own errors (``raise_exception``) are ValueErrors too."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer.chat_template); pass prompts to generate() instead")
        _check_conversation(conversation)
        context = {
            "messages": list(conversation),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.token(self.bos_token_id) or "",
            "eos_token": self.token(self.eos_token_id) or "",
        }
        text = render(self.chat_template, text_limit(max_tokens), _limit_reason(max_tokens), context)
        # The template writes the special tokens itself, so none are added when encoding.
        return self.encode(text, add_special_tokens=False, max_tokens=max_tokens) if tokenize else text


def text_limit(max_tokens: int | None) -> int:
    """The most characters of text a budget of ``max_tokens`` tokens admits (None: no budget)."""
    if max_tokens is None:
        return MAX_TEXT_CHARS
    return min(MAX_CHARS_PER_TOKEN * max_tokens, MAX_TEXT_CHARS)


def _limit_reason(max_tokens: int | None) -> str:
    if max_tokens is None or MAX_CHARS_PER_TOKEN * max_tokens > MAX_TEXT_CHARS:
        return "the most text rayk tokenizes"
    return f"{MAX_CHARS_PER_TOKEN} characters per token of {max_tokens} tokens"


def _check_conversation(conversation) -> None:
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence) or not conversation:
        raise TypeError(f"a conversation must be a non-empty list of {{'role': ..., 'content': ...}} messages, got {conversation!r:.80}")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise TypeError(f"message {i} must be a dict with string 'role' and 'content', got {message!r:.80}")


class IncrementalDetokenizer:
    """Text of the tokens generated after a prompt, produced one token at a time."""

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_WINDOW:])
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = len(self.ids)  # ids before this are already emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        """Appends a token; returns the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""
        new_text = after[len(before) :]
        self.prefix_offset = max(self.read_offset - _WINDOW, 0)
        self.read_offset = len(self.ids)
        self.text += new_text
        return new_text
