"""``alignloop serve``: an OpenAI-compatible completions endpoint for any HF model.

So a team can host the judge (or the writer) of Constitutional AI on another machine::

    GET  /v1/models        -> {"object": "list", "data": [{"id": NAME, "object": "model", ...}]}
    POST /v1/completions   {"prompt": str | [str], "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                            "seed": int?, "logprobs": int?, "echo": false, "n": 1, "model": str?}
                           -> {"object": "text_completion", "choices": [{"index", "text", "logprobs",
                               "finish_reason"}], "usage": {...}}
    POST /v1/chat/completions  {"messages": [{"role", "content"}], "max_tokens", "temperature", "seed"}
                           (the tokenizer's chat template, or the contents joined for a plain LM)
    GET  /health

``logprobs: k`` returns ``tokens``, ``token_logprobs``, ``top_logprobs`` (k alternatives) and
``text_offset`` per token; with ``echo: true`` the prompt's tokens come first (the first token
has no log-prob), so ``echo: true, max_tokens: 0`` scores given text -- the way the CAI judge
asks for p("(A)") and p("(B)"). Sampling is seeded (same request + seed, same text). Requests
are served one at a time (a lock): the model is shared and the CPU is the limit.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignloop.errors import UserError
from alignloop.runs import say

MAX_PROMPTS = 1024


class CompletionRequest(BaseModel):
    """The OpenAI completions request fields we honour; other fields (e.g. ``user``) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatRequest(BaseModel):
    """The OpenAI chat request fields we honour (no log-probs: use completions with echo for those)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The model input for a chat: the tokenizer's chat template, or the contents joined by newlines
    for a plain LM without one (what a base model would be given)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return "\n".join(m.content for m in messages)


def chat(model: Any, tokenizer: Any, name: str, req: ChatRequest) -> dict[str, Any]:
    """Answer one chat request through :func:`complete` (one choice)."""
    creq = CompletionRequest(
        prompt=chat_prompt(tokenizer, req.messages),
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
    )
    done = complete(model, tokenizer, name, creq)
    c = done["choices"][0]
    return {
        "id": done["id"].replace("cmpl-", "chatcmpl-"),
        "object": "chat.completion",
        "created": done["created"],
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                     "finish_reason": c["finish_reason"]}],
        "usage": done["usage"],
    }  # fmt: skip


def _sampling(req: CompletionRequest) -> Any:
    from alignloop.generation import SamplingSettings

    return SamplingSettings(
        temperature=max(req.temperature, 1e-6),
        top_p=req.top_p,
        max_new_tokens=req.max_tokens,
        do_sample=req.temperature > 0,
    )


def complete(
    model: Any, tokenizer: Any, name: str, req: CompletionRequest, batch_size: int = 16
) -> dict[str, Any]:
    """Answer one completions request (the server's work, callable without HTTP)."""
    from alignloop.generation import sample

    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise UserError(f"'prompt' must hold 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if req.echo and seq2seq:
        raise UserError(
            "echo is not available for a seq2seq (encoder-decoder) model: its prompt is not generated text"
        )
    expanded = [p for p in prompts for _ in range(req.n)]
    seed = req.seed if req.seed is not None else int(time.time() * 1000) % (2**31)
    choices: list[dict[str, Any]] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for b in range(0, len(expanded), batch_size):
        chunk = expanded[b : b + batch_size]
        if req.max_tokens > 0:
            s = sample(model, tokenizer, chunk, _sampling(req), seed=seed + b // batch_size)
            prompt_ids, gen_ids = [list(p) for p in s.prompt_ids], [list(r) for r in s.response_ids]
            texts, finished = s.texts, s.finished
        else:
            prompt_ids = [list(p) for p in tokenizer(chunk, add_special_tokens=True)["input_ids"]]
            gen_ids, texts, finished = [[] for _ in chunk], ["" for _ in chunk], [False for _ in chunk]
        usage["prompt_tokens"] += sum(len(x) for x in prompt_ids)
        usage["completion_tokens"] += sum(len(g) for g in gen_ids)
        logprobs: list[dict[str, Any] | None] = [None] * len(chunk)
        if req.logprobs is not None:
            logprobs = _logprobs(model, tokenizer, chunk, prompt_ids, gen_ids, req)
        for j, text in enumerate(texts):
            choices.append(
                {
                    "index": b + j,
                    "text": (chunk[j] + text) if req.echo else text,
                    "logprobs": logprobs[j],
                    "finish_reason": "stop" if finished[j] else "length",
                }
            )
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": usage,
    }


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


def create_app(model: Any, tokenizer: Any, name: str, batch_size: int = 16) -> Any:
    """The FastAPI app serving one loaded model under ``name``."""
    try:
        from fastapi import FastAPI, HTTPException
    except ImportError:
        raise UserError("alignloop serve needs FastAPI", fix="pip install 'alignloop[web]'") from None

    app = FastAPI(title="alignloop serve", description=f"OpenAI-compatible completions for {name}")
    lock = threading.Lock()
    created = int(time.time())

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "alignloop"}],
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict[str, Any]:
        if req.model is not None and req.model != name:
            raise HTTPException(404, f"model {req.model!r} is not served here; this server has {name!r}")
        with lock:
            try:
                return complete(model, tokenizer, name, req, batch_size)
            except (UserError, ValueError) as e:
                raise HTTPException(400, e.line() if isinstance(e, UserError) else str(e)) from None

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict[str, Any]:
        if req.model is not None and req.model != name:
            raise HTTPException(404, f"model {req.model!r} is not served here; this server has {name!r}")
        with lock:
            try:
                return chat(model, tokenizer, name, req)
            except (UserError, ValueError) as e:
                raise HTTPException(400, e.line() if isinstance(e, UserError) else str(e)) from None

    return app


def serve(
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    device: str | None = None,
    batch_size: int = 16,
) -> None:
    """Load ``model_id`` and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("alignloop serve needs uvicorn", fix="pip install 'alignloop[web]'") from None
    from alignloop.models import load_lm

    model, tokenizer = load_lm(model_id, device=device)
    served = name or model_id
    app = create_app(model, tokenizer, served, batch_size)
    say(f"[serve] {served} at http://{host}:{port}/v1 (completions, models)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
