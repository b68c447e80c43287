"""Model backends for the writer (critiques, revisions) and the judge (AI preference labels).

Two backends with the same two methods:

- :class:`LocalLM`: an HF model in this process (``world:base``, a folder, a hub id).
- :class:`OpenAIClient`: any OpenAI-compatible HTTP server (``alignloop serve``, vLLM, ...),
  ``/v1/completions`` (log-probs with ``echo``) or ``/v1/chat/completions`` (text answers).

``generate(prompts, max_tokens, temperature, seed) -> list[str]`` and
``continuation_logprobs(prompts, continuations) -> list[float]``:

    log p(c | x) = sum_{t : offset(t) >= len(x)} log p(tok_t | tok_<t)        over tokenize(x + c)

The whole text ``x + c`` is tokenized once and the tokens that start at or after the end of
``x`` are summed: exactly what an OpenAI server's ``echo=True, max_tokens=0`` returns as
``token_logprobs`` and ``text_offset``, so the local and the HTTP backend compute the same
numbers with the same code (:func:`echo_logprobs`, also used by the server).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignloop.errors import UserError


def default_judge(model: str) -> str:
    """The judge when none is given: the model itself (the notes' RLAIF: the model is asked which
    response it prefers), except the world's base, whose AI judge is ``world:judge`` (the base
    fine-tuned to read the prompt when it compares; the base alone does not: docs/world.md)."""
    return "world:judge" if model == "world:base" else model


@dataclass
class TokenScores:
    """Per-token scores of one text (OpenAI ``logprobs`` layout; the first token has no log-prob)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------
# Scoring with a local model (shared by LocalLM and the server)
# ----------------------------------------------------------------------------------------------


def response_logits(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> Any:
    """(B, R, V) next-token logits at each response position, for causal or seq2seq models.

    Causal: logits at column ``P - 1 + t`` of ``[left-padded prompt | response]`` predict token t.
    Seq2seq: the prompt is the encoder input; the decoder input is ``[start, r_0, r_1, ...]``.
    """
    import torch

    from alignloop.models import build_batch

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    start = getattr(model.config, "decoder_start_token_id", None)
    b = build_batch(
        prompt_ids, response_ids, pad, seq2seq=seq2seq, decoder_start_id=start if start is not None else pad
    )
    b = b.to(next(model.parameters()).device)
    with torch.inference_mode():
        if seq2seq:
            out = model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                decoder_input_ids=b.decoder_input_ids,
                decoder_attention_mask=b.decoder_attention_mask,
            )
            return out.logits.float()
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        P, R = b.prompt_width, b.response_ids.shape[1]
        return out.logits[:, P - 1 : P - 1 + R].float()


def score_tokens(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    top: int = 0,
) -> list[tuple[list[float], list[dict[str, float] | None]]]:
    """``(log-probs, top-k alternatives)`` of every response token, one entry per row."""
    import torch

    logp = torch.log_softmax(response_logits(model, prompt_ids, response_ids), dim=-1)
    out = []
    for i, r in enumerate(response_ids):
        n = len(r)
        ids = torch.as_tensor(list(r), dtype=torch.long, device=logp.device)
        lp = logp[i, :n].gather(-1, ids[:, None]).squeeze(-1).tolist() if n else []
        tops: list[dict[str, float] | None] = [None] * n
        if top > 0 and n:
            v, ix = logp[i, :n].topk(min(top, logp.shape[-1]), dim=-1)
            tops = [
                {tokenizer.decode([int(j)]): float(x) for x, j in zip(vr.tolist(), ir.tolist(), strict=True)}
                for vr, ir in zip(v, ix, strict=True)
            ]
        out.append((lp, tops))
    return out


def echo_logprobs(model: Any, tokenizer: Any, texts: Sequence[str], top: int = 0) -> list[TokenScores]:
    """Per-token log-probs of whole texts under a causal model (what ``echo=True`` returns).

    A text longer than the model's context keeps its last ``context`` tokens (the first kept
    token then has no log-prob, like the first token of any text).
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(
            "echo log-probs need a causal model; a seq2seq model scores answers given a prompt",
            fix="use a causal judge, or the local backend (which scores seq2seq answers)",
        )
    from alignloop.models import context_length

    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True)
    ids = [list(x) for x in enc["input_ids"]]
    offs = [list(o) for o in enc["offset_mapping"]]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise UserError(f"text {empty[0]} has no tokens", fix="send non-empty prompts")
    ctx = context_length(model)
    if ctx is not None:  # longer than the context: keep the end (the question and the answer are there)
        ids, offs = [x[-ctx:] for x in ids], [o[-ctx:] for o in offs]
    scored = score_tokens(model, tokenizer, [x[:1] for x in ids], [x[1:] for x in ids], top)
    out = []
    for x, offsets, (lp, tops) in zip(ids, offs, scored, strict=True):
        out.append(
            TokenScores(
                tokens=[tokenizer.decode([t]) for t in x],
                token_logprobs=[None, *lp],
                top_logprobs=[None, *tops],
                text_offset=[int(o[0]) for o in offsets],
            )
        )
    return out


def continuation_sum(scores: TokenScores, prompt_chars: int) -> float:
    """Sum of the log-probs of the tokens that start at or after character ``prompt_chars``."""
    total, n = 0.0, 0
    for lp, off in zip(scores.token_logprobs, scores.text_offset, strict=True):
        if off >= prompt_chars and lp is not None:
            total += lp
            n += 1
    if n == 0:
        raise UserError("the answer has no tokens of its own after the prompt", fix="check templates.options")
    return total


# ----------------------------------------------------------------------------------------------
# The local backend
# ----------------------------------------------------------------------------------------------


class LocalLM:
    """An HF model in this process as writer and judge."""

    def __init__(self, model_id: str, device: str | None = None, batch_size: int = 16):
        from alignloop.models import load_lm

        self.name = model_id
        self.model, self.tokenizer = load_lm(model_id, device=device)
        self.batch_size = batch_size
        self.seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))

    def generate(
        self, prompts: Sequence[str], max_tokens: int = 48, temperature: float = 1.0, seed: int = 0
    ) -> list[str]:
        """One sampled continuation per prompt; chunk ``b`` samples with seed ``seed * 1_000_003 + b``."""
        from alignloop.generation import SamplingSettings, sample

        settings = SamplingSettings(
            temperature=max(temperature, 1e-6), max_new_tokens=max_tokens, do_sample=temperature > 0
        )
        out: list[str] = []
        for b, i in enumerate(range(0, len(prompts), self.batch_size)):
            s = sample(
                self.model,
                self.tokenizer,
                list(prompts[i : i + self.batch_size]),
                settings,
                seed=seed * 1_000_003 + b,
            )
            out.extend(t.strip() for t in s.texts)
        return out

    def generate_chat(
        self, conversations: Sequence[list[dict[str, str]]], max_tokens: int = 48, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[str]:  # fmt: skip
        """The assistant's next turn of each conversation: :meth:`generate` after its rendering by the
        model's chat template with the generation prompt (:func:`alignloop.chat.prompt_text`)."""
        from alignloop.chat import prompt_text

        texts = [
            prompt_text(self.tokenizer, m, f"{self.name}: conversation {i + 1}")
            for i, m in enumerate(conversations)
        ]
        return self.generate(texts, max_tokens, temperature, seed)

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """``log p(continuation | prompt)`` for each pair (see the module docstring)."""
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            ps, cs = prompts[i : i + self.batch_size], continuations[i : i + self.batch_size]
            if self.seq2seq:  # the prompt is the encoder input, the answer the decoder's target
                p_ids = self.tokenizer(list(ps), add_special_tokens=True)["input_ids"]
                c_ids = self.tokenizer([c.strip() for c in cs], add_special_tokens=False)["input_ids"]
                out.extend(sum(lp) for lp, _ in score_tokens(self.model, self.tokenizer, p_ids, c_ids))
                continue
            scored = echo_logprobs(self.model, self.tokenizer, [p + c for p, c in zip(ps, cs, strict=True)])
            out.extend(continuation_sum(s, len(p)) for s, p in zip(scored, ps, strict=True))
        return out


# ----------------------------------------------------------------------------------------------
# The OpenAI-compatible HTTP backend
# ----------------------------------------------------------------------------------------------


class OpenAIClient:
    """An OpenAI-compatible server as writer and judge.

    ``url``: the server (``http://host:8000`` or ``.../v1``). ``model``: the model name to ask
    for (default: the first one ``/v1/models`` lists). ``api``: ``completions`` (log-probs,
    soft labels) or ``chat`` (text answers: hard labels). The key, if any, comes from
    ``$ALIGNLOOP_API_KEY`` or ``$OPENAI_API_KEY``.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api: str = "completions",
        batch_size: int = 16,
        timeout: float = 300.0,
        retries: int = 3,
    ):
        try:
            import httpx
        except ImportError:
            raise UserError("an HTTP judge needs httpx", fix="pip install httpx") from None
        if api not in ("completions", "chat"):
            raise UserError(f"unknown API {api!r}", fix="use 'completions' or 'chat'")
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api, self.batch_size, self.retries = api, batch_size, retries
        key = os.environ.get("ALIGNLOOP_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)
        self.model = model or self._first_model()
        self.name = f"{url}#{self.model}"

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import time

        import httpx

        url = self.base + path
        for attempt in range(self.retries):
            try:
                r = self.http.request(method, url, json=payload)
            except httpx.TransportError as e:
                if attempt == self.retries - 1:
                    raise UserError(
                        f"no OpenAI-compatible server at {self.base} ({type(e).__name__}: {e})",
                        fix="start one with 'alignloop serve --model ID' or check the URL",
                    ) from None
                time.sleep(0.5 * 2**attempt)
                continue
            if r.status_code >= 500 and attempt < self.retries - 1:
                time.sleep(0.5 * 2**attempt)
                continue
            if r.status_code != 200:
                raise UserError(f"{url} answered HTTP {r.status_code}: {r.text[:300]}")
            try:
                return r.json()
            except ValueError:
                raise UserError(f"{url} answered with something that is not JSON: {r.text[:200]!r}") from None
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        data = self._request("GET", "/models").get("data") or []
        if not data or "id" not in data[0]:
            raise UserError(f"{self.base}/models lists no model", fix="pass the model name (--judge-model)")
        return str(data[0]["id"])

    def generate(
        self, prompts: Sequence[str], max_tokens: int = 48, temperature: float = 1.0, seed: int = 0
    ) -> list[str]:
        """One continuation per prompt; chunk ``b`` of the prompts is sent with seed ``seed * 1_000_003 + b``."""
        out: list[str] = []
        for b, i in enumerate(range(0, len(prompts), self.batch_size)):
            chunk = list(prompts[i : i + self.batch_size])
            kw = {
                "model": self.model,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed * 1_000_003 + b,
            }
            if self.api == "chat":
                out += self._chat([[{"role": "user", "content": p}] for p in chunk], kw)
                continue
            reply = self._request("POST", "/completions", {**kw, "prompt": chunk})
            choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise UserError(
                    f"{self.base}/completions returned {len(choices)} choices for {len(chunk)} prompts"
                )
            out.extend(str(c.get("text", "")).strip() for c in choices)
        return out

    def _chat(self, conversations: Sequence[list[dict[str, str]]], kw: dict[str, Any]) -> list[str]:
        """One ``/chat/completions`` request a conversation (seeds ``kw["seed"] + j``): the reply's text."""
        out = []
        for j, messages in enumerate(conversations):
            reply = self._request(
                "POST", "/chat/completions", {**kw, "seed": kw["seed"] + j, "messages": messages}
            )
            out.append(str(reply["choices"][0]["message"]["content"] or "").strip())
        return out

    def generate_chat(
        self, conversations: Sequence[list[dict[str, str]]], max_tokens: int = 48, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[str]:  # fmt: skip
        """The assistant's next turn of each conversation, from the server's chat endpoint (which applies
        the served model's template); chunk ``b`` is sent with seed ``seed * 1_000_003 + b``."""
        if self.api != "chat":
            raise UserError(
                "conversational prompts (message lists) to an HTTP writer go to its chat endpoint",
                self.name,
                "pass --api chat (the server renders the messages with its model's chat template)",
            )
        out: list[str] = []
        for b, i in enumerate(range(0, len(conversations), self.batch_size)):
            kw = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature,
                  "seed": seed * 1_000_003 + b}  # fmt: skip
            out += self._chat(conversations[i : i + self.batch_size], kw)
        return out

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """``log p(continuation | prompt)`` from ``echo=True, max_tokens=0, logprobs=1``."""
        if self.api == "chat":
            raise UserError("a chat endpoint gives no log-probs of given text", fix="use --api completions")
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            ps, cs = prompts[i : i + self.batch_size], continuations[i : i + self.batch_size]
            texts = [p + c for p, c in zip(ps, cs, strict=True)]
            payload = {
                "model": self.model,
                "prompt": texts,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 1,
                "temperature": 0,
            }
            reply = self._request("POST", "/completions", payload)
            choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(texts):
                raise UserError(
                    f"{self.base}/completions returned {len(choices)} choices for {len(texts)} prompts"
                )
            for c, p in zip(choices, ps, strict=True):
                lp = c.get("logprobs") or {}
                if "token_logprobs" not in lp or "text_offset" not in lp:
                    raise UserError(
                        f"{self.base}/completions gave no token_logprobs/text_offset with echo",
                        fix="the server must support echo with logprobs (alignloop serve, vLLM), or use --api chat",
                    )
                s = TokenScores(
                    lp.get("tokens", []),
                    lp["token_logprobs"],
                    lp.get("top_logprobs") or [],
                    lp["text_offset"],
                )
                out.append(continuation_sum(s, len(p)))
        return out

    def answers(self, prompts: Sequence[str], max_tokens: int = 8) -> list[str]:
        """Greedy short answers (the chat path of the judge)."""
        return self.generate(prompts, max_tokens=max_tokens, temperature=0.0, seed=0)


def open_backend(
    spec: str,
    model: str | None = None,
    api: str = "completions",
    device: str | None = None,
    batch_size: int = 16,
) -> LocalLM | OpenAIClient:
    """A backend from a model id (local) or an ``http(s)://`` URL (OpenAI-compatible server)."""
    if is_url(spec):
        return OpenAIClient(spec, model=model, api=api, batch_size=batch_size)
    return LocalLM(spec, device=device, batch_size=batch_size)


def soft_preference(logp_a: float, logp_b: float) -> float:
    """``P(A) = p(A) / (p(A) + p(B)) = sigmoid(log p(A) - log p(B))``: the options' normalised probability."""
    d = logp_a - logp_b
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)
