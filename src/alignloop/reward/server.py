"""``alignloop reward serve``: any reward SPEC as an HTTP service (batch in, scores out).

Protocol (what ``load_reward("http://host:port")`` speaks)::

    POST /score   {"prompts": [str], "completions": [str]}  ->  {"scores": [float]}
    GET  /health  ->  {"status": "ok", "reward": SPEC, "kind": "model" | "classifier" | ...}

Requests are scored one at a time (a lock): the model is shared and the CPU is the limit.
A malformed request gets HTTP 422 with the reason; at most ``MAX_ITEMS`` pairs per request.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, Field

from alignloop.errors import UserError
from alignloop.reward.functions import Reward, load_reward
from alignloop.runs import say

MAX_ITEMS = 8192


class ScoreRequest(BaseModel):
    prompts: list[str] = Field(max_length=MAX_ITEMS)
    completions: list[str] = Field(max_length=MAX_ITEMS)


class ScoreReply(BaseModel):
    scores: list[float]


def create_app(reward: Reward) -> Any:
    """The FastAPI app serving ``reward``."""
    try:
        from fastapi import FastAPI, HTTPException
    except ImportError:
        raise UserError("alignloop reward serve needs FastAPI", fix="pip install 'alignloop[web]'") from None

    app = FastAPI(title="alignloop reward", description=f"reward {reward.spec}")
    lock = threading.Lock()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "reward": reward.spec, "kind": reward.kind, "label": reward.label}

    @app.post("/score", response_model=ScoreReply)
    def score(req: ScoreRequest) -> ScoreReply:
        if len(req.prompts) != len(req.completions):
            raise HTTPException(
                422,
                f"{len(req.prompts)} prompts but {len(req.completions)} completions: give one prompt per completion",
            )
        with lock:
            try:
                return ScoreReply(scores=reward(req.prompts, req.completions))
            except UserError as e:
                raise HTTPException(422, e.line()) from None

    return app


def serve(
    spec: str, host: str = "127.0.0.1", port: int = 8008, batch_size: int = 32, device: str | None = None
) -> None:
    """Load the reward and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("alignloop reward serve needs uvicorn", fix="pip install 'alignloop[web]'") from None
    reward = load_reward(spec, device=device, batch_size=batch_size)
    app = create_app(reward)
    say(f"[reward] serving {spec} ({reward.kind}) at http://{host}:{port}/score")
    uvicorn.run(app, host=host, port=port, log_level="warning")
