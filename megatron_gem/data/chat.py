"""Chat formatting shared by SFT data and evaluation: roles, the plain template, chat templates.

A model is evaluated on the prompts it was fine-tuned on, so the SFT data
(``megatron_gem.data.sft``) and the evaluation (``megatron_gem.eval``) must turn a conversation
into the same token ids. This module is the one place that says how:

* ``ROLES``: the message roles both accept.
* The plain template (SentencePiece, or any tokenizer without a chat template), defined on ids:
  for each message ``ids(PLAIN_HEADERS[role]) + ids(content) + ([eod] if assistant)``; the
  generation prompt is the history followed by ``ids("Assistant:")`` and a response is
  ``ids(text) + [eod]`` (``PlainTemplate``). Each piece is tokenized on its own, so the result
  does not depend on how a tokenizer normalizes newlines or merges across the join. Loss: the
  assistant content ids and its eod.
* A HuggingFace chat template (``ChatTemplate``): the prompt is the render of the history with
  the generation prompt, the answer is what the render of ``history + [answer]`` adds to it.

Pure Python (no Megatron, numpy or transformers import): the tokenizer trainer uses the
headers too.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = [
    "PLAIN_HEADERS",
    "ROLES",
    "TEMPLATES",
    "ChatTemplate",
    "PlainTemplate",
    "plain_message_text",
    "plain_render",
]

ROLES = ("system", "user", "assistant")
# --template of the SFT data and of the evaluation: the tokenizer's chat template when it has one
# (auto), the chat template (chat) or the plain template (plain).
TEMPLATES = ("auto", "chat", "plain")
# The role headers of the plain SFT chat template (see docs/data.md). Tokenizer training includes
# them (megatron_gem.data.tokenizer.iter_training_text) so that they are in the vocabulary.
PLAIN_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}


def plain_message_text(role: str, content: str) -> str:
    """One message as it reads in the plain template (``"User: ..."``)."""
    return f"{PLAIN_HEADERS[role]} {content}"


def plain_render(messages: list[dict]) -> str:
    """Readable text of the plain SFT template (for display; ids come from PlainTemplate)."""
    return (
        " ".join(plain_message_text(m["role"], m["content"]) for m in messages)
        + " "
        + PLAIN_HEADERS["assistant"]
    )


class PlainTemplate:
    """The plain template on ids, for one tokenizer's ``encode`` (text -> ids, no special
    tokens) and end token ``eod``."""

    def __init__(self, encode: Callable[[str], list[int]], eod: int):
        self.encode = encode
        self.eod = eod
        self.headers = {r: list(encode(h)) for r, h in PLAIN_HEADERS.items()}

    def encode_messages(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """``(ids, assistant_mask)`` of a conversation: the mask is True on the assistant
        content ids and the eod after them (the tokens SFT trains on)."""
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            head = self.headers[m["role"]]
            body = list(self.encode(m["content"]))
            is_asst = m["role"] == "assistant"
            if is_asst:
                body = body + [self.eod]
            ids += head + body
            mask += [False] * len(head) + [is_asst] * len(body)
        return ids, mask

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The generation prompt: the history's ids followed by ``ids("Assistant:")``."""
        for m in messages:
            if m["role"] not in self.headers:
                raise ValueError(
                    f"plain template: role {m['role']!r} is not one of {sorted(self.headers)}"
                )
        return self.encode_messages(messages)[0] + self.headers["assistant"]

    def response_ids(self, text: str) -> list[int]:
        """The ids of an answer after the prompt: ``ids(text) + [eod]``."""
        return list(self.encode(text)) + [self.eod]


class ChatTemplate:
    """A HuggingFace tokenizer's chat template (jinja), rendered to text."""

    def __init__(self, hf, template: str):
        self.hf = hf
        self.template = template

    def render(self, messages: Sequence[dict], generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def answer_renders(self, history: Sequence[dict], answer: dict) -> tuple[str, str]:
        """``(prompt, full)``: ``history`` rendered with the generation prompt (it ends where the
        answer starts) and ``history + [answer]`` rendered without (it ends after the answer's
        end-of-turn marker). When the template is prefix-stable, the answer is
        ``full[len(prompt):]``."""
        return self.render(history, True), self.render([*history, answer])
