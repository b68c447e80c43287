"""Conversational records -> the text a model reads, through the tokenizer's chat template (no torch).

TRL's conversational format: a prompt is a list of messages (``{"role", "content"}``, see
:func:`alignloop.records.check_messages`), a completion the assistant turn(s) that follow it. Every
stage turns them into text here, in one place, TRL's way:

- the prompt text is the template's rendering of the prompt messages WITH the generation prompt
  (``add_generation_prompt=True``: the template's opening of the assistant turn);
- the completion text is what rendering the whole conversation (prompt + assistant turns) adds after
  that: the assistant content plus the template's end-of-turn where it writes one.

So ``prompt_text + completion_text`` is exactly the rendered conversation, and the text convention
of :func:`alignloop.records.full_text` holds for conversational data too. Text records pass through
unchanged, whatever the tokenizer. A tokenizer without a template, or a template that raises, is one
:class:`~alignloop.errors.UserError` naming the record (``file:line``) and ``--chat-template FILE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.errors import UserError
from alignloop.records import is_conversational

TEMPLATE_FIX = (
    "give the model a chat template: --chat-template FILE (a Jinja file such as a model's "
    "chat_template.jinja; recipe key chat_template), or use text prompts"
)


def use_chat_template(tokenizer: Any, path: str | Path | None) -> Any:
    """Give ``tokenizer`` the Jinja chat template in file ``path`` (``--chat-template FILE``); None
    keeps the tokenizer's own. Returns the tokenizer."""
    if path is None or path == "":
        return tokenizer
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"chat template file not found: {p}", fix="--chat-template takes a Jinja template file"
        )
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError("the chat template file is empty", str(p), "write a Jinja chat template into it")
    tokenizer.chat_template = text
    return tokenizer


def render(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, where: str | None = None
) -> str:
    """``tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)``
    with its failures as one UserError at ``where``."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "conversational data (a list of messages) but the tokenizer has no chat template",
            where,
            TEMPLATE_FIX,
        )
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
    except Exception as e:  # a template is the user's code: whatever it raises is their input's error
        first = (str(e).splitlines() or [""])[0][:160]
        raise UserError(
            f"the chat template failed on this conversation ({type(e).__name__}: {first})",
            where,
            "fix the messages or the template (--chat-template FILE)",
        ) from None


def prompt_text(tokenizer: Any, prompt: Any, where: str | None = None) -> str:
    """The model's prompt text: a text prompt as it is; messages rendered with the generation prompt.

    A template that writes the BOS token itself (Llama's ``{{ bos_token }}``) for a tokenizer that
    also adds one: the text starts after it, so that tokenizing the text as every stage does (with
    the tokenizer's special tokens) gives the template's ids, ``apply_chat_template(..., tokenize=True)``,
    with one BOS, not two."""
    if not is_conversational(prompt):
        return prompt
    text = render(tokenizer, prompt, True, where)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS in front of a text by itself."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (
        bool(ids)
        and ids[0] == tokenizer.bos_token_id
        and ids != tokenizer("a", add_special_tokens=False)["input_ids"]
    )


def prompt_ids(tokenizer: Any, prompt: Any, where: str | None = None) -> list[int]:
    """The token ids a model reads for ``prompt``: its :func:`prompt_text` with the tokenizer's special
    tokens; for a conversation these are ``apply_chat_template(prompt, add_generation_prompt=True)``'s."""
    return list(tokenizer(prompt_text(tokenizer, prompt, where), add_special_tokens=True)["input_ids"])


def completion_text(tokenizer: Any, prompt: Any, completion: Any, where: str | None = None) -> str:
    """The completion as the continuation of :func:`prompt_text`: for a conversational prompt, what
    rendering ``prompt + completion`` adds after the rendered prompt (a text completion of a
    conversational prompt is the assistant content). A text prompt's completion is unchanged."""
    if not is_conversational(prompt):
        return completion
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    head = render(tokenizer, prompt, True, where)
    whole = render(tokenizer, [*prompt, *completion], False, where)
    if not whole.startswith(head):
        raise UserError(
            "the chat template renders the conversation so that it does not start with the rendered prompt "
            f"(prompt ends {head[-30:]!r}, conversation has {whole[len(head) - 30 : len(head)]!r} there)",
            where,
            "the template's generation prompt must be how it opens an assistant turn (--chat-template FILE)",
        )
    return whole[len(head) :]


def turn_end(tokenizer: Any) -> str:
    """What the chat template writes after an assistant's content to end the turn: ``</s>`` for the
    world's template, ``<|im_end|>\n`` for ChatML, ``""`` for a template that writes none (or no
    template). Read off a probe conversation: the :func:`completion_text` of the reply ``ok`` after ``ok``."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    text = completion_text(tokenizer, [{"role": "user", "content": "ok"}], "ok", "the chat template")
    i = text.find("ok")
    return text[i + 2 :] if i >= 0 else ""


def reads_template(reward: Any) -> bool:
    """Whether a reward reads a conversation's assistant turn as the template renders it, end-of-turn
    included: a reward model (kind ``model`` / ``ensemble``), which ``reward train`` showed rendered
    conversations, does; text rewards (the gold judge, Python, HTTP, classifiers) read the assistant's
    content. TRL's GRPO does the same: reward models get the template's rendering, functions the content."""
    return getattr(reward, "kind", None) in ("model", "ensemble")


def sampled_texts(
    reward: Any, prompts: list[str], texts: list[str], finished: list[bool], chat: frozenset[str], end: str
) -> list[str]:
    """What ``reward`` reads of sampled completions ``texts`` (each the assistant's content, its stop
    token cut) of rendered ``prompts``, in a rollout or an evaluation.

    A reward that :func:`reads_template` reads a finished sample of a conversational prompt (one of
    ``chat``) with the template's end-of-turn ``end`` (:func:`turn_end`) after it: the rendered assistant
    turn, as :func:`completion_text` showed it in training. A truncated sample has no end-of-turn; text
    rewards and text prompts read the content as it is.
    """
    if not end or not chat or not reads_template(reward):
        return list(texts)
    return [t + end if f and p in chat else t for p, t, f in zip(prompts, texts, finished, strict=True)]


def as_text(tokenizer: Any, record: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """A record with a conversational prompt as a text record (a copy): ``prompt`` rendered, and each
    completion (``chosen``, ``rejected``, ``completion``, ``completions[i].text``) as its continuation;
    ``"conversational": True`` marks it (its completions get no added EOS: the template's end-of-turn
    ends them, :func:`is_rendered`). A text record is returned as it is."""
    prompt = record.get("prompt")
    if not is_conversational(prompt):
        return record
    out = {**record, "prompt": prompt_text(tokenizer, prompt, where), "conversational": True}
    for key in ("chosen", "rejected", "completion"):
        if key in record:
            out[key] = completion_text(tokenizer, prompt, record[key], where)
    if isinstance(record.get("completions"), list):
        out["completions"] = [
            {**c, "text": completion_text(tokenizer, prompt, c["text"], where)} if isinstance(c, dict) else c
            for c in record["completions"]
        ]
    return out


def is_rendered(record: Any) -> bool:
    """A record that :func:`as_text` rendered from messages (a dict or a pydantic record)."""
    extra = record if isinstance(record, dict) else (getattr(record, "model_extra", None) or {})
    return extra.get("conversational") is True


def transcript(
    tokenizer: Any, messages: list[dict[str, Any]], where: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """A whole conversation (an SFT transcript) as the model reads it, and where its assistant turns are.

    Returns ``(text, spans)``: ``text`` the template's rendering of ``messages`` (no generation prompt;
    a template BOS dropped as in :func:`prompt_text`), ``spans`` the ``(start, end)`` character ranges
    of each assistant turn in it: what rendering the conversation up to and including that turn adds
    after the rendering of the turns before it with the generation prompt, i.e. the assistant content
    plus the template's end-of-turn. These are the trained tokens (TRL's assistant-only loss); the
    system and user turns and the template's assistant headers are context only.
    """
    text = render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], True, where) if i else ""
        upto = render(tokenizer, messages[: i + 1], False, where)
        if not (upto.startswith(head) and text.startswith(upto)):
            raise UserError(
                f"the chat template renders assistant turn {i + 1} so that the conversation before it is not "
                "its prefix (a template that rewrites earlier turns cannot mark the assistant's tokens)",
                where,
                "use a template whose rendering of a conversation extends that of its beginning (--chat-template FILE)",
            )
        spans.append((len(head), len(upto)))
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
        spans = [(max(0, a - len(bos)), b - len(bos)) for a, b in spans]
    return text, spans


def assistant_mask(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of a :func:`transcript`'s text (with the tokenizer's special tokens, as every stage
    tokenizes) and a 0/1 flag a token: 1 where the token starts inside an assistant span (a fast
    tokenizer's offsets). The ids are ``apply_chat_template(messages, tokenize=True)``'s."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    flags = [int(b > a and any(s <= a < e for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), flags
