"""Chat formats: how prompts, responses and documents become token ids for one model.

Tokenisation and the prompt template are a parameter of the evaluation (``ChatFormat``), so the
same code serves an HF tokenizer with a chat template and the SentencePiece + plain template of
the embedded world. The templates themselves are ``megatron_gem.data.chat``, the code the SFT
data is made with: a model is scored on exactly the ids it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from megatron_gem.data.chat import TEMPLATES, ChatTemplate, PlainTemplate, plain_render

__all__ = [
    "ChatFormat",
    "ChatTemplateFormat",
    "PlainTemplateFormat",
    "hf_chat_format",
    "megatron_chat_format",
    "plain_render",
]


@dataclass
class ChatFormat:
    """How prompts, responses and documents become token ids for one model.

    encode/decode: plain text <-> ids, no special tokens. render: messages -> the prompt text that
    ends where the answer starts. A response is ``encode(text) + [eos_id]`` (its end token is
    part of its probability); a held-out document is ``[bos_id]? + encode(text) + [eos_id]``
    (as Megatron's pre-training data: text + eod). Subclasses match the SFT data's templates.
    """

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    render: Callable[[list[dict]], str]
    eos_id: int
    pad_id: int | None = None
    bos_id: int | None = None
    stop_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.stop_ids = tuple(dict.fromkeys((self.eos_id, *self.stop_ids)))

    def _bos(self) -> list[int]:
        return [] if self.bos_id is None else [self.bos_id]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._bos() + list(self.encode(self.render(messages)))

    def response_ids(self, text: str, messages: list[dict] | None = None) -> list[int]:
        """Ids of a complete response (end token included) after the prompt of ``messages``."""
        return list(self.encode(text)) + [self.eos_id]

    def document_ids(self, text: str) -> list[int]:
        return self._bos() + list(self.encode(text)) + [self.eos_id]

    def decode_response(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:k]
                break
        return self.decode(ids).strip()


class PlainTemplateFormat(ChatFormat):
    """The plain SFT template of ``megatron_gem.data.sft.PlainTemplateEncoder``, on ids: per
    message ``ids(header) + ids(content) (+ [eod] after an assistant turn)``, each piece encoded
    on its own; the prompt ends with ``ids("Assistant:")``; a response is ``ids(text) + [eod]``
    (both ``megatron_gem.data.chat.PlainTemplate``)."""

    def __init__(self, encode, decode, eos_id: int, pad_id: int | None = None):
        super().__init__(
            encode=encode, decode=decode, render=plain_render, eos_id=eos_id, pad_id=pad_id
        )
        self.plain = PlainTemplate(encode, eos_id)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.plain.prompt_ids(messages)


class ChatTemplateFormat(ChatFormat):
    """An HF chat template, as ``sft_data.ChatTemplateEncoder`` trains on it: the prompt is the
    render with the generation prompt; a response is the ids of the full render after the
    prompt's ids, up to and including the first stop token (the template's end of turn)."""

    def __init__(self, hf_tok, chat_template: str | None = None):
        self.hf = hf_tok
        self.template = chat_template or hf_tok.chat_template
        self.chat = ChatTemplate(hf_tok, self.template)
        render = lambda m: self.chat.render(m, True)  # noqa: E731
        enc = lambda t: list(hf_tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        super().__init__(
            encode=enc,
            decode=lambda ids: hf_tok.decode(ids, skip_special_tokens=True),
            render=render,
            eos_id=hf_tok.eos_token_id,
            pad_id=hf_tok.pad_token_id,
        )
        # Special tokens the template puts after an answer (e.g. <|im_end|>) also end a response.
        probe = [{"role": "user", "content": "hi"}]
        tail = self.response_ids("ok", probe, stop=False)[len(enc("ok")) :]
        special = set(hf_tok.all_special_ids)
        end_of_turn = [t for t in tail if t in special][:1]
        self.stop_ids = tuple(dict.fromkeys((*self.stop_ids, *end_of_turn)))

    def response_ids(
        self, text: str, messages: list[dict] | None = None, stop: bool = True
    ) -> list[int]:
        if messages is None:
            raise ValueError("ChatTemplateFormat.response_ids needs the prompt messages")
        prompt_text, full_text = self.chat.answer_renders(
            messages, {"role": "assistant", "content": text}
        )
        prompt = self._bos() + list(self.encode(prompt_text))
        full = self.encode(full_text)
        if full[: len(prompt)] != prompt:
            raise ValueError(
                "chat template is not prefix-stable: the prompt's ids are not a "
                "prefix of the full conversation's ids"
            )
        resp = full[len(prompt) :]
        if stop:
            for k, t in enumerate(resp):
                if t in self.stop_ids:
                    return resp[: k + 1]
        return resp


def hf_chat_format(tokenizer, template: str = "auto") -> ChatFormat:
    """Format for an HF tokenizer, mirroring ``sft_data.make_encoder``: its chat template when
    it has one (``auto``/``chat``), else the plain template (``plain``)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be auto, chat or plain, got {template!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "hf_chat_format: the tokenizer has no eos_token_id; responses need an end token"
        )
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("hf_chat_format: the tokenizer has no chat template; use template='plain'")
    if template != "plain" and has:
        return ChatTemplateFormat(tokenizer)
    return PlainTemplateFormat(
        lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )


def megatron_chat_format(tokenizer, template: str = "auto") -> ChatFormat:
    """Format for a Megatron tokenizer (``megatron_gem.data.tokenizer.build_tokenizer``), the ids
    training saw: HF tokenizers go through ``hf_chat_format``; others (SentencePiece) use the
    plain template with Megatron's ``tokenize``/``detokenize``/``eod``."""
    from megatron_gem.data.tokenizer import hf_tokenizer, pad_or_eod, text_to_ids

    hf = hf_tokenizer(tokenizer)
    if hf is not None:
        return hf_chat_format(hf, template)
    if template == "chat":
        raise ValueError("the chat template needs an HF tokenizer; use template='plain'")
    return PlainTemplateFormat(
        lambda t: text_to_ids(tokenizer, t),
        lambda ids: tokenizer.detokenize(list(ids)),
        eos_id=int(tokenizer.eod),
        pad_id=pad_or_eod(tokenizer),
    )
