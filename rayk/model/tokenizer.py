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
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_WINDOW = 6  # ids of context kept before the unread ones: enough for byte-level merges to settle


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None, chat_template: str | None):
        self.backend = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self._compiled_template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = True, tokenize: bool = False):
        """The conversation rendered by the model's template (text, or its ids with ``tokenize``)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer.chat_template); pass prompts to generate() instead")
        _check_conversation(conversation)
        text = self._template().render(
            messages=list(conversation),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token(self.bos_token_id) or "",
            eos_token=self.token(self.eos_token_id) or "",
        )
        # The template writes the special tokens itself, so none are added when encoding.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self):
        if self._compiled_template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            environment.globals["raise_exception"] = raise_exception
            self._compiled_template = environment.from_string(self.chat_template)
        return self._compiled_template


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
