"""``alignloop serve``: an OpenAI-compatible completions endpoint for any HF model.

So a team can host the judge (or the writer) of Constitutional AI on another machine, and any
OpenAI client (the official ``openai`` package included) can talk to a model alignloop trained::

    GET  /v1/models        -> {"object": "list", "data": [{"id": NAME, "object": "model", ...}]}
    POST /v1/completions   {"prompt": str | [str], "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                            "n": 1, "seed": int?, "stop": str | [str]?, "logprobs": int?, "echo": false,
                            "stream": false, "stream_options": {"include_usage": bool}?, "model": str?}
                           -> {"object": "text_completion", "choices": [{"index", "text", "logprobs",
                               "finish_reason"}], "usage": {...}}
    POST /v1/chat/completions  {"messages": [{"role", "content"}], "max_completion_tokens" | "max_tokens",
                            "temperature", "top_p", "n", "seed", "stop", "logprobs": bool, "top_logprobs": int,
                            "stream", "stream_options"}
                           (the prompt is :func:`chat_prompt`: the tokenizer's chat template, or the
                           contents joined for a plain LM)
    GET  /health

Every parameter a request may carry is either honoured as the OpenAI API documents it, or accepted only
at the value that changes nothing (``frequency_penalty: 0``, ``logit_bias: {}``, ``tools: []``, ...), or
refused: a 400 whose message names it (OpenAI's error body, ``{"error": {"message", "type", "param"}}``),
as for any invalid value (``n`` above :data:`MAX_N`, more than :data:`MAX_STOP` stop strings, ...).

- ``stop``: the text ends before the first stop string (not included), ``finish_reason: "stop"``; the
  tokens, log-probs and usage count end with the token that reached it. Sampling ends once every row of
  a batch has met one.
- ``stream: true``: server-sent events, ``data: {chunk}`` (``text_completion`` chunks, or
  ``chat.completion.chunk`` with a ``delta``), a last chunk per choice with its ``finish_reason``, a usage
  chunk with ``stream_options.include_usage``, then ``data: [DONE]``. The text is sent while it is sampled,
  a piece per token (text that could begin a stop string waits until it cannot); with log-probs, which are
  scored after sampling, the answer is sampled first, then sent a token (and its log-probs) a chunk. Either
  way the pieces add up to exactly the text the same request gives without ``stream``.
- ``logprobs: k`` (completions) returns ``tokens``, ``token_logprobs``, ``top_logprobs`` (k alternatives)
  and ``text_offset`` per token; with ``echo: true`` the prompt's tokens come first (the first token has no
  log-prob), so ``echo: true, max_tokens: 0`` scores given text -- the way the CAI judge asks for p("(A)")
  and p("(B)"). Chat: ``logprobs: true`` (+ ``top_logprobs: k``) gives ``{"content": [{"token", "logprob",
  "bytes", "top_logprobs"}]}``.
- ``seed``: same request + seed, same text (streamed or not); without one a fresh seed each request.

Requests are served one at a time (a lock): the model is shared and the CPU is the limit.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignloop.errors import UserError
from alignloop.runs import say

MAX_PROMPTS = 1024  # prompts x n in one request
MAX_N = 32  # completions per prompt
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_TOKENS = 4096
DEFAULT_CHAT_TOKENS = 64  # chat without max_completion_tokens / max_tokens (OpenAI: up to the context)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    """What both endpoints share; a field not declared here is refused by name unless it is listed in
    ``NEUTRAL`` with the value it has (a value that changes nothing)."""

    model_config = ConfigDict(extra="allow")

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "frequency_penalty": (None, 0),
        "presence_penalty": (None, 0),
        "logit_bias": (None, {}),
    }

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata: accepted, changes nothing

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if stops and any(s == "" for s in stops):
            raise ValueError("a stop string cannot be empty")
        return stops or None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        for key, value in (self.model_extra or {}).items():
            if key not in self.NEUTRAL:
                raise ValueError(f"parameter '{key}' is not supported by alignloop serve")
            if value not in self.NEUTRAL[key]:
                allowed = " or ".join(json.dumps(x) for x in self.NEUTRAL[key] if x is not None)
                raise ValueError(f"parameter '{key}' is not supported by alignloop serve (only {allowed})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' needs 'stream': true")
        return self

    def stops(self) -> list[str]:
        return list(self.stop or [])  # a list after validation


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Request.NEUTRAL,
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    """One message; other fields only empty (an assistant message sent back as the client returned it
    carries ``"refusal": null, "tool_calls": null, ...``)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _nothing_else(self) -> ChatMessage:
        for key, value in (self.model_extra or {}).items():
            if value not in (None, [], {}):
                raise ValueError(f"message field '{key}' is not supported by alignloop serve")
        return self

    def text(self) -> str:
        """The message's text: a string, or the ``{"type": "text", "text"}`` parts joined."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (only text)")
            out.append(part["text"])
        return "".join(out)


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Request.NEUTRAL,
        "response_format": (None, {"type": "text"}),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": (None, True, False),
        "store": (None, False),
        "metadata": (None, {}),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("'max_tokens' and 'max_completion_tokens' differ: give one")
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as e:
                raise ValueError(f"messages[{i}]: {e}") from None
        return self

    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_TOKENS


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The model input for a chat: the tokenizer's chat template with the generation prompt, rendered as
    every stage renders a conversation (:func:`alignloop.chat.prompt_text`; a template that raises is a
    400), or the contents joined by newlines for a plain LM without one (what a base model would be given)."""
    if getattr(tokenizer, "chat_template", None):
        from alignloop.chat import prompt_text

        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        return prompt_text(tokenizer, msgs, "the request's messages")
    return "\n".join(m.text() for m in messages)


# ----------------------------------------------------------------------------------------------
# Generation: one request -> choices (shared by both endpoints, streamed or not)
# ----------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """One answer: its text, why it ended, the text of each kept token (they concatenate to ``text``,
    after the echoed prompt) and, when asked, its completions-style ``logprobs`` object."""

    text: str
    finish_reason: str
    tokens: int = 0  # generated tokens kept (the end-of-text token included)
    pieces: list[str] = field(default_factory=list)  # the text of each token (for stop, log-prob streams)
    logprobs: dict[str, Any] | None = None
    echo: str = ""  # the prompt, when echoed
    eos: bool = False  # the last token is the end-of-sequence token (no text; left out of chat log-probs)


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Where ``text`` ends before its first stop string (the earliest match of any), or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def token_pieces(
    tokenizer: Any, prompt_ids: list[int], ids: list[int], text: str, seq2seq: bool
) -> list[str]:
    """The text each token adds to the continuation of the prompt (``generation.continuation_texts`` of
    ``ids[:k+1]`` less that of ``ids[:k]``), cut to ``text``: the pieces concatenate to exactly ``text``
    (word-level decoders insert spaces between words, so decoding a token alone would lose them).
    One piece per token (some may be empty)."""
    from alignloop.generation import continuation_texts

    prefixes = continuation_texts(
        tokenizer, [prompt_ids] * len(ids), [ids[:k] for k in range(1, len(ids) + 1)], seq2seq
    )
    pieces, shown = [], ""
    for k in range(1, len(ids) + 1):
        cur = prefixes[k - 1][: len(text)]
        if not cur.startswith(shown) or len(shown) >= len(text):
            pieces.append("")
            continue
        pieces.append(cur[len(shown) :])
        shown = cur
    if pieces and shown != text:
        pieces[-1] += text[len(shown) :]
    return pieces


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop string."""
    return max((k for st in stops for k in range(1, len(st)) if text.endswith(st[:k])), default=0)


class Follow:
    """Follows one batch as it is sampled (``sample``'s ``on_step``): each row's text so far, cut at
    its first stop string; hands the text that can no longer change to ``on_piece(row, piece)``; ends
    the sampling once every row has ended (its end-of-text token, or a stop string).

    A row's text is the continuation of its prompt (``generation.continuation_texts``: what ``sample``
    returns): it grows by ``decode(ids[s:]) - decode(ids[s:-1])`` over a short window ``s`` of the
    prompt's last tokens (``prompt_ids``; causal models) and the row's (a word-level decoder puts
    spaces between words: a token decoded alone would lose them); a seq2seq row starts with a space
    where its prompt's text ends without one (``lead``). Text that could be the start of a stop string
    is held back until it is not.
    """

    WINDOW = 8

    def __init__(
        self,
        tokenizer: Any,
        rows: int,
        stops: list[str],
        ends: set[int],
        on_piece: Any = None,
        prompt_ids: list[list[int]] | None = None,
        lead: list[str] | None = None,
    ):
        self.tokenizer, self.stops, self.ends, self.on_piece = tokenizer, stops, ends, on_piece
        tails = prompt_ids or [[] for _ in range(rows)]
        self.ids: list[list[int]] = [list(p[-self.WINDOW :]) for p in tails]
        self.start = [len(x) for x in self.ids]  # where the row's own tokens begin in ``ids``
        self.lead = lead or [""] * rows
        self.text = [""] * rows
        self.sent = [""] * rows
        self.done = [False] * rows

    def __call__(self, column: Any) -> bool:
        for r, t in enumerate(column.tolist()):
            if self.done[r]:
                continue
            if t in self.ends:
                self.done[r] = True
                continue
            ids = self.ids[r]
            ids.append(t)
            s = max(0, len(ids) - 1 - self.WINDOW)
            before = self.tokenizer.decode(
                ids[s:-1], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            after = self.tokenizer.decode(
                ids[s:], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            if after.endswith("\ufffd"):  # a character split over tokens: wait for its last byte
                continue
            if after.startswith(before):
                self.text[r] += after[len(before) :]
            else:  # a decoder that rewrites earlier text (or a split character just completed): the row's own tokens
                own = self.tokenizer.decode(ids[self.start[r] :], skip_special_tokens=True)
                self.text[r] = (self.text[r][:1] if self.text[r][:1].isspace() else "") + own
            if self.lead[r] and self.text[r] and not self.text[r][0].isspace():
                self.text[r] = self.lead[r] + self.text[r]
            cut = cut_at_stop(self.text[r], self.stops)
            if cut is not None:
                self.done[r] = True
                self.send(r, self.text[r][:cut])
            else:
                self.send(r, self.text[r][: len(self.text[r]) - held_back(self.text[r], self.stops)])
        return all(self.done)

    def send(self, r: int, text: str) -> None:
        """Hand over what ``text`` adds to what row ``r`` already sent."""
        if self.on_piece is not None and len(text) > len(self.sent[r]) and text.startswith(self.sent[r]):
            self.on_piece(r, text[len(self.sent[r]) :])
            self.sent[r] = text


def check_request(model: Any, req: CompletionRequest) -> list[str]:
    """The request's prompts, after the checks that need the model (a :class:`UserError` each)."""
    from alignloop.models import context_length

    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or len(prompts) * req.n > MAX_PROMPTS:
        raise UserError(
            f"'prompt' x 'n' must be 1 to {MAX_PROMPTS} completions, got {len(prompts)} x {req.n}",
            fix="send fewer prompts per request",
        )
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if req.echo and seq2seq:
        raise UserError(
            "echo is not available for a seq2seq (encoder-decoder) model: its prompt is not generated text"
        )
    ctx = None if seq2seq else context_length(model)
    if ctx is not None and req.max_tokens >= ctx:
        raise UserError(
            f"invalid 'max_tokens': {req.max_tokens} leaves no room for a prompt in a {ctx}-token context"
        )
    return prompts


def generate(
    model: Any, tokenizer: Any, req: CompletionRequest, batch_size: int = 16, on_piece: Any = None
) -> tuple[list[Choice], dict[str, int]]:
    """Answer one completions request: ``n`` choices per prompt (choice ``i * n + j`` is prompt ``i``'s
    ``j``-th), cut at the stop strings, with log-probs when asked; and the usage counts.

    ``on_piece(choice, text)`` receives each choice's text while it is sampled (:class:`Follow`). Sampling
    ends early once every row of a batch has met a stop string: the tokens drawn are the same.
    """
    from alignloop.generation import eos_ids, sample

    prompts = check_request(model, req)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    expanded = [p for p in prompts for _ in range(req.n)]
    seed = req.seed if req.seed is not None else int(time.time() * 1000) % (2**31)
    stops = req.stops()
    ends = set(eos_ids(model, tokenizer))
    choices: list[Choice] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for b in range(0, len(expanded), batch_size):
        chunk = expanded[b : b + batch_size]
        hand = None if on_piece is None else (lambda r, text, b=b: on_piece(b + r, text))
        follow = None
        if stops or hand:  # the prompts' tails and leads make the followed text the continuation
            from alignloop.records import continuation

            tails = [list(x) for x in tokenizer(chunk, add_special_tokens=True)["input_ids"]]
            shown = tokenizer.batch_decode(
                tails, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            lead = [continuation(p, "x")[:-1] for p in shown] if seq2seq else None
            follow = Follow(tokenizer, len(chunk), stops, ends, hand, None if seq2seq else tails, lead)
        if req.max_tokens > 0:
            s = sample(model, tokenizer, chunk, _sampling(req), seed=seed + b // batch_size, on_step=follow)
            prompt_ids, gen_ids = [list(p) for p in s.prompt_ids], [list(r) for r in s.response_ids]
            texts, finished = list(s.texts), list(s.finished)
        else:
            prompt_ids = [list(p) for p in tokenizer(chunk, add_special_tokens=True)["input_ids"]]
            gen_ids, texts, finished = [[] for _ in chunk], ["" for _ in chunk], [False for _ in chunk]
        pieces, eos = [], list(finished)
        for j in range(len(chunk)):
            cut = cut_at_stop(texts[j], stops) if stops else None
            eos[j] = finished[j] and cut is None
            if cut is not None:
                texts[j], finished[j] = texts[j][:cut], True
            needed = cut is not None or (req.stream and req.logprobs is not None)  # streamed a token a chunk
            p = token_pieces(tokenizer, prompt_ids[j], gen_ids[j], texts[j], seq2seq) if needed else []
            if cut is not None:  # keep the tokens up to the one that reached the stop string
                k = next((i for i in range(len(p)) if len("".join(p[: i + 1])) >= cut), len(p) - 1) + 1
                gen_ids[j], p = gen_ids[j][:k], p[:k]
            pieces.append(p)
            if follow is not None:
                follow.send(j, texts[j])  # the rest of the row (held-back text that was no stop string)
        usage["prompt_tokens"] += sum(len(x) for x in prompt_ids)
        usage["completion_tokens"] += sum(len(g) for g in gen_ids)
        logprobs: list[dict[str, Any] | None] = [None] * len(chunk)
        if req.logprobs is not None:
            logprobs = _logprobs(model, tokenizer, chunk, prompt_ids, gen_ids, req)
        for j, text in enumerate(texts):
            choices.append(
                Choice(
                    text=text,
                    finish_reason="stop" if finished[j] else "length",
                    tokens=len(gen_ids[j]),
                    pieces=pieces[j],
                    logprobs=logprobs[j],
                    echo=chunk[j] if req.echo else "",
                    eos=eos[j],
                )
            )
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return choices, usage


def _sampling(req: CompletionRequest) -> Any:
    from alignloop.generation import SamplingSettings

    return SamplingSettings(
        temperature=max(req.temperature, 1e-6),
        top_p=req.top_p,
        max_new_tokens=req.max_tokens,
        do_sample=req.temperature > 0,
    )


def _logprobs(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    prompt_ids: list[list[int]],
    gen_ids: list[list[int]],
    req: CompletionRequest,
) -> list[dict[str, Any]]:
    """OpenAI ``logprobs`` objects: the prompt's tokens first with ``echo``, then the generated ones."""
    from alignloop.cai.judges import echo_logprobs, score_tokens

    top = req.logprobs or 0
    if req.echo:
        heads = echo_logprobs(model, tokenizer, prompts, top)
    gens = (
        score_tokens(model, tokenizer, prompt_ids, gen_ids, top)
        if any(gen_ids)
        else [([], [])] * len(prompts)
    )
    out = []
    for j, (lp, tops) in enumerate(gens):
        g = gen_ids[j][: len(lp)]
        toks = [tokenizer.decode([t]) for t in g]
        base = len(prompts[j]) if req.echo else 0
        # where each generated token's text starts (approximate for decoders that add spaces)
        offsets = [base + len(tokenizer.decode(g[:k], skip_special_tokens=True)) for k in range(len(g))]
        obj = {
            "tokens": toks,
            "token_logprobs": lp,
            "top_logprobs": tops if top else None,
            "text_offset": offsets,
        }
        if req.echo:
            h = heads[j]
            obj = {
                "tokens": h.tokens + obj["tokens"],
                "token_logprobs": h.token_logprobs + obj["token_logprobs"],
                "top_logprobs": (h.top_logprobs + (tops or [])) if top else None,
                "text_offset": h.text_offset + obj["text_offset"],
            }
        out.append(obj)
    return out


# ----------------------------------------------------------------------------------------------
# Responses: completions and chat, whole or as server-sent events
# ----------------------------------------------------------------------------------------------


def complete(
    model: Any, tokenizer: Any, name: str, req: CompletionRequest, batch_size: int = 16
) -> dict[str, Any]:
    """Answer one completions request (the server's work, callable without HTTP)."""
    return completion_body(*generate(model, tokenizer, req, batch_size), name)


def completion_body(choices: list[Choice], usage: dict[str, int], name: str) -> dict[str, Any]:
    """A ``text_completion`` response."""
    return {
        **_head("cmpl", "text_completion", name),
        "choices": [
            {"index": i, "text": c.echo + c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": usage,
    }


def as_completion_request(tokenizer: Any, req: ChatRequest) -> CompletionRequest:
    """The completions request a chat request amounts to (its prompt: :func:`chat_prompt`)."""
    return CompletionRequest(
        prompt=chat_prompt(tokenizer, req.messages),
        max_tokens=req.token_budget(),
        temperature=req.temperature,
        top_p=req.top_p,
        n=req.n,
        seed=req.seed,
        stop=req.stop,
        stream=req.stream,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
    )


def as_message(c: Choice) -> Choice:
    """A chat answer is a text of its own: the continuation's leading whitespace (``prompt + text`` is
    what the model wrote) is dropped from the text and from its first pieces."""
    n = len(c.text) - len(c.text.lstrip())
    pieces, drop = [], n
    for p in c.pieces:
        cut = min(drop, len(p))
        pieces.append(p[cut:])
        drop -= cut
    return replace(c, text=c.text[n:], pieces=pieces)


def chat(model: Any, tokenizer: Any, name: str, req: ChatRequest, batch_size: int = 16) -> dict[str, Any]:
    """Answer one chat request through :func:`generate`."""
    choices, usage = generate(model, tokenizer, as_completion_request(tokenizer, req), batch_size)
    return chat_body([as_message(c) for c in choices], usage, name, req.logprobs)


def chat_body(choices: list[Choice], usage: dict[str, int], name: str, logprobs: bool) -> dict[str, Any]:
    """A ``chat.completion`` response."""
    return {
        **_head("chatcmpl", "chat.completion", name),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.logprobs, 0, c.tokens - c.eos) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage,
    }


def _head(prefix: str, obj: str, name: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": name,
    }


def _chat_logprobs(lp: dict[str, Any] | None, start: int, stop: int | None) -> dict[str, Any]:
    """Completions-style log-probs of tokens ``start:stop`` in the chat layout (``content`` entries)."""
    if lp is None:
        return {"content": [], "refusal": None}

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    tops = lp["top_logprobs"] or [None] * len(lp["tokens"])
    content = [
        {**entry(t, x), "top_logprobs": [entry(a, y) for a, y in (top or {}).items()]}
        for t, x, top in zip(
            lp["tokens"][start:stop], lp["token_logprobs"][start:stop], tops[start:stop], strict=True
        )
    ]
    return {"content": content, "refusal": None}


def _slice_logprobs(lp: dict[str, Any] | None, start: int, stop: int) -> dict[str, Any] | None:
    return None if lp is None else {k: (v[start:stop] if v is not None else None) for k, v in lp.items()}


class EventStream:
    """The server-sent events of one streamed answer, on either endpoint: per choice an opening chunk
    (chat: the assistant role; completions with ``echo``: the prompt), its text pieces, a closing chunk
    with the ``finish_reason``; then a usage chunk when ``stream_options.include_usage``, and ``[DONE]``."""

    def __init__(self, name: str, chat_mode: bool, req: _Request) -> None:
        obj = "chat.completion.chunk" if chat_mode else "text_completion"
        self.head = _head("chatcmpl" if chat_mode else "cmpl", obj, name)
        self.chat = chat_mode
        self.usage = req.stream_options is not None and req.stream_options.include_usage

    def _event(self, choice: dict[str, Any]) -> str:
        body: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def opening(self, i: int, echo: str = "", echo_logprobs: dict[str, Any] | None = None) -> list[str]:
        if self.chat:
            return [self._event({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})]  # fmt: skip
        if echo:
            return [self._event({"index": i, "text": echo, "logprobs": echo_logprobs, "finish_reason": None})]
        return []

    def piece(self, i: int, text: str, logprobs: dict[str, Any] | None = None) -> str:
        """``logprobs``: the piece's token in the endpoint's own layout."""
        key = {"delta": {"content": text}} if self.chat else {"text": text}
        return self._event({"index": i, **key, "logprobs": logprobs, "finish_reason": None})

    def closing(self, i: int, finish_reason: str) -> str:
        key = {"delta": {}} if self.chat else {"text": ""}
        return self._event({"index": i, **key, "logprobs": None, "finish_reason": finish_reason})

    def end(self, usage: dict[str, int]) -> list[str]:
        out = [f"data: {json.dumps({**self.head, 'choices': [], 'usage': usage})}\n\n"] if self.usage else []
        return [*out, "data: [DONE]\n\n"]

    @staticmethod
    def error(message: str) -> str:
        """An error after the stream began (what the openai client raises as ``APIError``)."""
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return f"data: {json.dumps(body)}\n\n"


def stream_events(
    choices: list[Choice], usage: dict[str, int], name: str, chat_mode: bool, req: _Request
) -> Iterator[str]:
    """The events of a finished answer (the way log-probs are streamed: they are scored after
    sampling): one piece per token with that token's log-probs."""
    out = EventStream(name, chat_mode, req)
    for i, c in enumerate(choices):
        n_echo = len(c.logprobs["tokens"]) - len(c.pieces) if (c.logprobs and c.echo) else 0
        yield from out.opening(i, c.echo, _slice_logprobs(c.logprobs, 0, n_echo))
        for k, piece in enumerate(c.pieces[: len(c.pieces) - c.eos] if chat_mode else c.pieces):
            at = n_echo + k
            if chat_mode:
                yield out.piece(i, piece, _chat_logprobs(c.logprobs, at, at + 1) if c.logprobs else None)
            else:
                yield out.piece(i, piece, _slice_logprobs(c.logprobs, at, at + 1))
        yield out.closing(i, c.finish_reason)
    yield from out.end(usage)


def live_events(
    model: Any, tokenizer: Any, name: str, req: CompletionRequest, chat_mode: bool, outer: _Request,
    lock: threading.Lock, batch_size: int,
) -> Iterator[str]:  # fmt: skip
    """The events of an answer as it is sampled (no log-probs asked): a worker thread samples under the
    server's lock and hands each piece of text over a queue as soon as it can no longer change."""
    out = EventStream(name, chat_mode, outer)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    for i, p in enumerate(x for x in prompts for _ in range(req.n)):
        yield from out.opening(i, p if req.echo else "")
    pieces: queue.Queue[tuple[str, Any, Any]] = queue.Queue()

    def work() -> None:
        with lock:
            try:
                result = generate(model, tokenizer, req, batch_size, lambda i, t: pieces.put(("piece", i, t)))
            except Exception as e:  # noqa: BLE001 -- reported to the client in the stream, which is already open
                pieces.put(("error", e.line() if isinstance(e, UserError) else str(e), None))
                return
        pieces.put(("done", *result))

    threading.Thread(target=work, daemon=True).start()
    started: set[int] = set()
    while True:
        kind, a, b = pieces.get()
        if kind == "piece":
            if chat_mode and a not in started:  # a chat message drops the continuation's leading space
                b = b.lstrip()
                if not b:
                    continue
                started.add(a)
            yield out.piece(a, b)
        elif kind == "error":
            yield out.error(a)
            return
        else:
            for i, c in enumerate(a):
                yield out.closing(i, c.finish_reason)
            yield from out.end(b)
            return


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def openai_error(status: int, message: str, param: str | None = None) -> Any:
    """A JSON response in OpenAI's error layout (what its client turns into ``BadRequestError`` etc.)."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status
    )


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line from pydantic's errors of a request body: the first error, naming its parameter."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    msg = str(e.get("msg", "invalid request")).removeprefix("Value error, ")
    if not loc:
        return msg, None
    param = loc[0]
    path = param + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:])
    got = e.get("input")
    shown = f" (got {json.dumps(got)[:80]})" if isinstance(got, (int, float, str, bool)) else ""
    return f"invalid '{path}': {msg}{shown}", param


def create_app(model: Any, tokenizer: Any, name: str, batch_size: int = 16) -> Any:
    """The FastAPI app serving one loaded model under ``name``."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import StreamingResponse
    except ImportError:
        raise UserError("alignloop serve needs FastAPI", fix="pip install 'alignloop[web]'") from None

    app = FastAPI(title="alignloop serve", description=f"OpenAI-compatible completions for {name}")
    lock = threading.Lock()
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> Any:
        return openai_error(400, *validation_message(list(exc.errors())))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "alignloop"}],
        }

    def answer(req: CompletionRequest | ChatRequest) -> Any:
        if req.model is not None and req.model != name:
            return openai_error(
                404, f"model {req.model!r} is not served here; this server has {name!r}", "model"
            )
        chat_mode = isinstance(req, ChatRequest)
        creq = as_completion_request(tokenizer, req) if chat_mode else req
        if req.stream and creq.logprobs is None:
            try:
                check_request(model, creq)
            except UserError as e:
                return openai_error(400, e.line())
            events = live_events(model, tokenizer, name, creq, chat_mode, req, lock, batch_size)
            return StreamingResponse(events, media_type="text/event-stream")
        with lock:
            try:
                choices, usage = generate(model, tokenizer, creq, batch_size)
            except (UserError, ValueError) as e:
                return openai_error(400, e.line() if isinstance(e, UserError) else str(e))
        if chat_mode:
            choices = [as_message(c) for c in choices]
        if req.stream:
            return StreamingResponse(
                stream_events(choices, usage, name, chat_mode, req), media_type="text/event-stream"
            )
        if chat_mode:
            return chat_body(choices, usage, name, req.logprobs)
        return completion_body(choices, usage, name)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> Any:
        return answer(req)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> Any:
        return answer(req)

    return app


def serve(
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    device: str | None = None,
    batch_size: int = 16,
    chat_template: str | None = None,
) -> None:
    """Load ``model_id`` and serve it until interrupted (``chat_template``: a Jinja file for the chat
    endpoint, replacing the tokenizer's)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("alignloop serve needs uvicorn", fix="pip install 'alignloop[web]'") from None
    from alignloop.chat import use_chat_template
    from alignloop.models import load_lm

    model, tokenizer = load_lm(model_id, device=device)
    use_chat_template(tokenizer, chat_template)
    served = name or model_id
    app = create_app(model, tokenizer, served, batch_size)
    say(f"[serve] {served} at http://{host}:{port}/v1 (completions, chat/completions, models)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
