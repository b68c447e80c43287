"""Fast batched sampling with the KV cache, for causal and seq2seq models.

One loop, one forward per new token for the whole batch, the cache reused between steps::

    samples = sample(model, tokenizer, ["Q: why is the sky blue?"] * 8, SamplingSettings(top_p=0.9), seed=0)
    samples.prompt_ids, samples.response_ids, samples.texts, samples.finished

``engine="torch"`` (our loop; the default for every model whose forward takes a cache) or
``engine="hf"`` (``model.generate``, the fallback for any architecture).

Reproducible by construction: every row has its own seed, and the token drawn at step ``t`` uses
the uniform number ``u = splitmix64(row_seed, t)`` (inverse-CDF sampling). A row's completion
therefore depends on its prompt and its seed only -- not on the batch size, the other rows, a
resume or ``--limit`` (up to float rounding from padding, which can flip a draw that lands
within ~1e-7 of a boundary).

A response ends with the EOS token when the model emitted one (``finished``); it is kept in
``response_ids`` (its log-prob matters to PPO) and left out of ``texts``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from alignloop.config import Config
from alignloop.errors import UserError


class SamplingSettings(Config):
    """Sampling knobs. ``temperature=0`` or ``do_sample=False`` is greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_at_eos: bool = True
    do_sample: bool = True
    # who samples (alignloop.generation_backends): the live model through transformers, a vLLM engine
    # (CUDA), or auto (vLLM when installed and a GPU is there)
    backend: Literal["transformers", "vllm", "auto"] = "transformers"


OnStep = Callable[[Tensor], bool]  # (B,) tokens of one step -> stop sampling now?


@dataclass
class Samples:
    """One batch of sampled responses (lists, one entry per prompt)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    truncated: list[bool] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


# ----------------------------------------------------------------------------------------------
# Choosing the next token
# ----------------------------------------------------------------------------------------------


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to -inf. (B, V) -> (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability sums to >= ``p``.

    A token is dropped when the probability mass of the tokens ranked above it already reaches
    ``p``; the most likely token is always kept. (B, V) -> (B, V).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A 64-bit integer hash (SplitMix64's finaliser): well-mixed bits from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def row_seed(*parts: int | str) -> int:
    """A row's seed from e.g. (run seed, prompt id, completion index); strings hashed stably."""
    h = 0
    for p in parts:
        if isinstance(p, str):
            p = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
        h = splitmix64(h ^ (int(p) & MASK64))
    return h


def uniforms(seeds: Sequence[int], step: int) -> list[float]:
    """One number in [0, 1) per row for decoding step ``step``: ``splitmix64(seed ^ hash(step)) / 2^64``."""
    salt = splitmix64(step + 0x5EED)
    return [(splitmix64(s ^ salt) >> 11) * (1.0 / (1 << 53)) for s in seeds]


def _as_int64(x: int) -> int:
    """An unsigned 64-bit integer as the signed int64 with the same bits."""
    return x - (1 << 64) if x >= (1 << 63) else x


def _shift_right(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic: mask the sign fill)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_tensor(x: Tensor) -> Tensor:
    """:func:`splitmix64` on int64 tensors (two's-complement arithmetic wraps mod 2^64 like ``& MASK64``)."""
    x = x + _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def uniform_table(seeds: Sequence[int], steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Every row's uniform number for every step at once: ``(steps, B)`` float32, bit-identical to
    ``torch.tensor(uniforms(seeds, t))`` for each ``t`` -- one vectorised hash instead of B Python
    hashes per decoding step."""
    s = torch.tensor([_as_int64(int(x) & MASK64) for x in seeds], dtype=torch.int64)
    salt = torch.tensor([_as_int64(splitmix64(t + 0x5EED)) for t in range(steps)], dtype=torch.int64)
    bits = _shift_right(_splitmix64_tensor(s[None, :] ^ salt[:, None]), 11)  # 53 random bits
    return (bits.double() * (1.0 / (1 << 53))).float().to(device)


def next_tokens(logits: Tensor, settings: SamplingSettings, u: Tensor | None) -> Tensor:
    """Pick one token per row by inverse-CDF sampling with the row's uniform number.

    Args:
        logits: (B, V). u: (B,) uniforms in [0, 1) (ignored when greedy).
    Returns:
        (B,) long: the first token whose cumulative probability exceeds ``u`` (after temperature,
        top-k and top-p), i.e. a draw from the filtered distribution.
    """
    if not settings.do_sample or settings.temperature <= 0 or u is None:
        return logits.argmax(dim=-1)
    logits = logits.float() / settings.temperature
    logits = top_k_filter(logits, settings.top_k)
    logits = top_p_filter(logits, settings.top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    target = u.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(x) for x in extra)
    return sorted(ids)


def prompt_limit(model: Any, tokenizer: Any, max_new_tokens: int) -> int | None:
    """The most prompt tokens that still leave room for ``max_new_tokens`` (None = no limit)."""
    from alignloop.models import context_length

    if getattr(model.config, "is_encoder_decoder", False):
        limit = getattr(tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None
    ctx = context_length(model)
    return None if ctx is None else max(1, ctx - max_new_tokens)


def fit_prompts(
    prompt_ids: Sequence[Sequence[int]], limit: int | None, keep: str = "end"
) -> tuple[list[list[int]], list[bool]]:
    """Truncate prompts longer than ``limit`` tokens, keeping their ``end`` (what a causal model
    continues) or their ``start``. Returns the prompts and a truncated flag for each."""
    out, flags = [], []
    for p in prompt_ids:
        p = list(p)
        cut = limit is not None and len(p) > limit
        if cut:
            p = p[-limit:] if keep == "end" else p[:limit]
        out.append(p)
        flags.append(bool(cut))
    return out, flags


def encode_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    if prompts and isinstance(prompts[0], str):
        return [list(x) for x in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    return [list(p) for p in prompts]


# ----------------------------------------------------------------------------------------------
# The loops
# ----------------------------------------------------------------------------------------------


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _sampling(settings: SamplingSettings) -> bool:
    return settings.do_sample and settings.temperature > 0


# Finished rows leave the batch (and the KV cache) once this fraction of the batch has finished:
# the copy of the cache is paid rarely, and no forward is spent on a row that already ended.
DROP_FINISHED_AT = 0.25


def _sample_step(
    logits: Tensor, t: int, rows: Tensor, done: Tensor, tokens: Tensor, settings: SamplingSettings,
    u: Tensor | None, pad_id: int,
) -> Tensor:  # fmt: skip
    """Step ``t``'s token for every row still in the batch, written into ``tokens`` and returned."""
    tok = next_tokens(logits, settings, None if u is None else u[t, rows])
    tok = tok.masked_fill(done, pad_id)  # a finished row not yet dropped only pads
    tokens[rows, t] = tok
    return tok


def _rows_to_keep(tok: Tensor, done: Tensor, stop: Tensor, cache: Any) -> Tensor | None:
    """After a step, mark the rows that stopped in ``done`` (in place). Returns the rows that stay
    (the others already left ``cache``) once enough have finished to be worth a copy of the cache,
    an empty tensor when every row has finished, and None while the batch stays as it is."""
    done |= torch.isin(tok, stop)
    n_done = int(done.sum())
    if n_done == len(done):
        return done.new_zeros(0, dtype=torch.long)
    if n_done >= DROP_FINISHED_AT * len(done):
        keep = (~done).nonzero()[:, 0]
        cache.batch_select_indices(keep)
        return keep
    return None


def _causal_loop(
    model: Any,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    pad_id: int,
    stop: Tensor,
    seeds: list[int],
    on_step: OnStep | None = None,
) -> Tensor:
    """Returns (B, T) new tokens (``pad_id`` after a row has stopped)."""
    from transformers import DynamicCache

    from alignloop.models import _supports_logits_to_keep, position_ids_from_mask

    device = next(model.parameters()).device
    ids, prompt_mask = _left_pad(prompt_ids, pad_id, device)
    B, P = ids.shape
    T = settings.max_new_tokens
    # the attention mask for every step, allocated once: prompt part, then ones
    mask = torch.cat([prompt_mask, torch.ones((B, T), dtype=torch.long, device=device)], dim=1)
    position = position_ids_from_mask(prompt_mask)
    cache = DynamicCache(config=model.config)
    kw = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    out = model(
        input_ids=ids,
        attention_mask=prompt_mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
        **kw,
    )
    logits = out.logits[:, -1]
    next_pos = position[:, -1:] + 1
    u = uniform_table(seeds, T, device) if _sampling(settings) else None  # (T, B), drawn once
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # the original row of each row still in the batch
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(T):
        tok = _sample_step(logits, t, rows, done, tokens, settings, u, pad_id)
        if on_step is not None and on_step(tokens[:, t]):
            return tokens[:, : t + 1]
        if t + 1 == T:
            break
        keep = _rows_to_keep(tok, done, stop, cache) if settings.stop_at_eos else None
        if keep is not None:
            if len(keep) == 0:
                return tokens[:, : t + 1]
            rows, tok, mask, next_pos, done = rows[keep], tok[keep], mask[keep], next_pos[keep], done[keep]
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask[:, : P + t + 1],
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens


def _seq2seq_loop(
    model: Any,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    pad_id: int,
    stop: Tensor,
    seeds: list[int],
    on_step: OnStep | None = None,
) -> Tensor:
    """Encoder once, then the decoder one token at a time with its cache. Returns (B, T)."""
    from transformers import DynamicCache, EncoderDecoderCache

    device = next(model.parameters()).device
    B = len(prompt_ids)
    S = max(len(p) for p in prompt_ids)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    enc_mask = torch.zeros((B, S), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # encoders take right padding
        ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        enc_mask[i, : len(p)] = 1
    ids, enc_mask = ids.to(device), enc_mask.to(device)
    encoded = model.get_encoder()(input_ids=ids, attention_mask=enc_mask).last_hidden_state
    start = model.config.decoder_start_token_id
    start = pad_id if start is None else int(start)
    tok = torch.full((B,), start, dtype=torch.long, device=device)
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    T = settings.max_new_tokens
    u = uniform_table(seeds, T, device) if _sampling(settings) else None  # (T, B), drawn once
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # the original row of each row still in the batch
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(T):
        out = model(
            encoder_outputs=(encoded,),
            attention_mask=enc_mask,
            decoder_input_ids=tok[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        tok = _sample_step(out.logits[:, -1], t, rows, done, tokens, settings, u, pad_id)
        if on_step is not None and on_step(tokens[:, t]):
            return tokens[:, : t + 1]
        keep = _rows_to_keep(tok, done, stop, cache) if settings.stop_at_eos and t + 1 < T else None
        if keep is not None:
            if len(keep) == 0:
                return tokens[:, : t + 1]
            rows, tok, done = rows[keep], tok[keep], done[keep]
            encoded, enc_mask = encoded[keep], enc_mask[keep]
    return tokens


def _hf_generate(
    model: Any,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    pad_id: int,
    stop: list[int],
    seed: int,
) -> Tensor:
    """``model.generate`` under a forked RNG seeded with ``seed``. Returns (B, T) new tokens."""
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq:
        S = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), S), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, : len(p)] = torch.as_tensor(p)
            mask[i, : len(p)] = 1
        ids, mask = ids.to(device), mask.to(device)
    else:
        ids, mask = _left_pad(prompt_ids, pad_id, device)
    greedy = not settings.do_sample or settings.temperature <= 0
    kw: dict[str, Any] = {"do_sample": not greedy}
    if not greedy:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=0 if settings.stop_at_eos else settings.max_new_tokens,
            eos_token_id=stop if settings.stop_at_eos else None,
            pad_token_id=pad_id,
            **kw,
        )
    new = out[:, 1:] if seq2seq else out[:, ids.shape[1] :]
    return new


def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    settings: SamplingSettings | None = None,
    seed: int | Sequence[int] = 0,
    engine: str = "auto",
    on_step: OnStep | None = None,
) -> Samples:
    """Sample one response per prompt, as one batch.

    Args:
        model: a causal or seq2seq HF model (or a PeftModel around one).
        prompts: texts (tokenized with the model's special tokens) or token-id lists.
        settings: temperature, top_p, top_k, max_new_tokens, stop_at_eos, do_sample.
        seed: one int (row ``i`` gets ``row_seed(seed, i)``) or one seed per row. Same seeds, same
            prompts -> same tokens, whatever the batch. (``engine="hf"`` seeds torch's RNG with
            ``seed`` instead, so there the batch matters.)
        engine: ``"torch"`` our KV-cache loop, ``"hf"`` ``model.generate``, ``"auto"`` = torch.
        on_step: called after every step with the ``(B,)`` tokens just drawn (``pad`` for a row that
            has stopped); returning True ends sampling there, every row keeping what it has (a server
            streams text with it, and stops once each row has met a stop string). Torch engine only.

    Prompts longer than the context (less ``max_new_tokens``) are cut to fit, keeping their end
    for causal models (flagged in ``Samples.truncated``); nothing here raises on long input.
    """
    settings = settings or SamplingSettings()
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    ids = encode_prompts(tokenizer, prompts)
    if isinstance(seed, int):
        seeds = [row_seed(seed, i) for i in range(len(ids))]
    else:
        seeds = [int(x) for x in seed]
        if len(seeds) != len(ids):
            raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
    if not ids:
        return Samples([], [], [], [], [])
    if not seq2seq:
        from alignloop.models import context_length

        ctx = context_length(model)
        if ctx is not None and settings.max_new_tokens >= ctx:
            raise ValueError(
                f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in a {ctx}-token context"
            )
    ids, truncated = fit_prompts(
        ids, prompt_limit(model, tokenizer, settings.max_new_tokens), "start" if seq2seq else "end"
    )
    if not seq2seq:  # a causal model needs one token to condition on
        filler = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [p if p else [int(filler)] for p in ids]
    pad_id = int(tokenizer.pad_token_id)
    stop_list = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    stop = torch.as_tensor(stop_list or [-1], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if engine == "hf":
                if on_step is not None:
                    raise ValueError("on_step needs the torch engine")
                first = seed if isinstance(seed, int) else (seed[0] if seed else 0)
                new = _hf_generate(model, ids, settings, pad_id, stop_list, int(first) & 0x7FFFFFFF)
            else:
                loop = _seq2seq_loop if seq2seq else _causal_loop
                new = loop(model, ids, settings, pad_id, stop, seeds, on_step)
    finally:
        model.train(was_training)
    return _collect(
        tokenizer, ids, new.tolist(), set(stop_list) if settings.stop_at_eos else set(), truncated, seq2seq
    )


def _collect(
    tokenizer: Any,
    prompt_ids: list[list[int]],
    new: list[list[int]],
    stop: set[int],
    truncated: list[bool],
    seq2seq: bool = False,
) -> Samples:
    """Cut each row after its first stop token; its text (without the stop token) is the exact
    continuation of the prompt (:func:`continuation_texts`)."""
    responses, finished, shown = [], [], []
    for row in new:
        end = next((i for i, t in enumerate(row) if t in stop), None)
        responses.append(row if end is None else row[: end + 1])
        finished.append(end is not None)
        shown.append(row if end is None else row[:end])
    texts = continuation_texts(tokenizer, prompt_ids, shown, seq2seq)
    return Samples(prompt_ids, responses, texts, finished, truncated)


def continuation_texts(
    tokenizer: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], seq2seq: bool
) -> list[str]:
    """The text of each response as the continuation of its prompt, so ``prompt + text`` is the
    text the model wrote (TRL's convention; see :func:`alignloop.records.full_text`).

    Causal: ``decode(prompt + response)`` less ``decode(prompt)``, which keeps the leading space a
    word-level or SentencePiece tokenizer drops when the response is decoded alone (``" not very
    good ."``). Seq2seq (a new text, not a continuation): the decoded response, with a leading space
    where the prompt's text ends without one. Decoding never cleans up spaces (``" ."`` stays).
    """
    from alignloop.records import continuation

    def decode(rows: Sequence[Sequence[int]]) -> list[str]:
        return tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    alone, prompts = decode(response_ids), decode(prompt_ids)
    if seq2seq:
        return [continuation(p, r) if r else r for p, r in zip(prompts, alone, strict=True)]
    joint = decode([list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)])
    return [
        j[len(p) :] if j.startswith(p) else continuation(p, a)
        for p, j, a in zip(prompts, joint, alone, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Prompt files: JSONL, CSV, Parquet or a `datasets` name
# ----------------------------------------------------------------------------------------------


def read_table(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / CSV / Parquet file, or of a ``datasets`` dataset (``name`` or
    ``name:config``). File rows carry ``_line`` (their line or row number) for messages."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".jsonl", ".json", ".ndjson"):
            from alignloop.records import iter_jsonl

            text_start = path.read_text(encoding="utf-8", errors="replace").lstrip()[:1]
            if suffix == ".json" and text_start == "[":
                import json

                try:
                    rows = json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise UserError(f"invalid JSON ({e.msg})", f"{path}:{e.lineno}") from None
                if not all(isinstance(r, dict) for r in rows):
                    raise UserError("a JSON prompt file must be a list of objects", str(path))
                return [{**r, "_line": i + 1} for i, r in enumerate(rows)]
            return [{**obj, "_line": n} for n, obj in iter_jsonl(path)]
        if suffix in (".csv", ".tsv"):
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                return [{**row, "_line": n + 2} for n, row in enumerate(reader)]
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises several types for a bad file
                raise UserError(f"cannot read Parquet ({e})", str(path)) from None
            return [{**r, "_line": i + 1} for i, r in enumerate(rows)]
        raise UserError(
            f"unknown prompt file type {suffix!r}", str(path), "use .jsonl, .json, .csv or .parquet"
        )
    if path.suffix and (path.parent.exists() or suffix in (".jsonl", ".json", ".csv", ".parquet")):
        raise UserError(f"file not found: {path}", fix="check the path")
    return _dataset_rows(str(source), split)


def _dataset_rows(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name!r} is not a file, and `datasets` is not installed") from None
    from alignloop.hub import require_hub

    require_hub(name, "dataset")  # not 20-50 s of retries when the hub is out of reach
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # hub, network, missing split: all user-fixable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"cannot load {name!r} as a file or a `datasets` dataset ({first})",
            fix="check the path, or the dataset name, --split and network access",
        ) from None
    return [{**r, "_line": i} for i, r in enumerate(ds)]


def unescape(template: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line -> a newline and a tab."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def load_prompts(
    source: str | Path,
    prompt_column: str = "prompt",
    id_column: str = "id",
    template: str | None = None,
    split: str = "train",
    limit: int | None = None,
    skip_bad: bool = False,
    tokenizer: Any = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Prompt records ``{"id", "prompt", ...other columns}`` from any table.

    ``template`` (e.g. ``"Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:"``)
    is filled from each row's columns; without it the prompt is ``row[prompt_column]``: a text or a
    conversation (a list of messages, TRL's conversational format; kept as messages, checked as
    :func:`alignloop.records.check_messages` does, and rendered once with ``tokenizer``'s chat template
    when one is given, so a missing or raising template names its row). A row without an id column
    gets its row number. A missing column, an empty prompt or a duplicate id is a UserError naming the
    row -- or, with ``skip_bad``, skipped and listed in ``problems``.
    """
    from alignloop.chat import prompt_text
    from alignloop.records import check_messages, is_conversational

    rows = read_table(source, split)
    if limit is not None:
        rows = rows[:limit]
    if template is not None:
        template = unescape(template)
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{source}:{row.pop('_line', i + 1)}"
        columns = ", ".join(row) or "none"
        try:
            if template is not None:
                try:
                    text = template.format_map(row)
                except KeyError as e:
                    raise UserError(
                        f"the template names column {e.args[0]!r}, which this row lacks",
                        where,
                        f"columns: {columns}",
                    ) from None
                except (ValueError, IndexError) as e:
                    raise UserError(
                        f"bad --template ({e})", fix="use {column} placeholders; write {{ and }} for braces"
                    ) from None
            else:
                if prompt_column not in row:
                    raise UserError(
                        f"no {prompt_column!r} column",
                        where,
                        f"columns: {columns}; pass --prompt-column or --template",
                    )
                text = row[prompt_column]
            if is_conversational(text):
                try:
                    check_messages(text, "prompt")
                except ValueError as e:
                    raise UserError(str(e), where, "fix the messages (or pass --skip-bad)") from None
                if tokenizer is not None:
                    prompt_text(
                        tokenizer, text, where
                    )  # the template renders it (or one line saying why not)
            elif not isinstance(text, str) or not text.strip():
                raise UserError("empty prompt", where, "remove the row or fill it in (or pass --skip-bad)")
            pid = row.get(id_column)
            pid = str(i) if pid is None or pid == "" else str(pid)
            if pid in seen:
                raise UserError(
                    f"duplicate prompt id {pid!r}", where, "ids must be unique (completion ids are id-k)"
                )
        except UserError as e:
            if not skip_bad or e.what.startswith("bad --template"):
                raise
            problems.append(e.line())
            continue
        seen.add(pid)
        extra = {k: v for k, v in row.items() if k not in ("id", "prompt", id_column) and _jsonable(v)}
        out.append({**extra, "id": pid, "prompt": text})
    if not out:
        raise UserError(
            "no usable prompts", str(source), "is the file empty?" if not problems else problems[0]
        )
    return out, problems


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def _resample_repeats(
    backend: Any,
    chunk: list[dict[str, Any]],
    k: int,
    s: Samples,
    settings: SamplingSettings,
    seed: int,
    rounds: int,
) -> tuple[int, int, int]:
    """Sample again, in place in ``s``, each completion whose text repeats an earlier one of its
    prompt (rows ``j*k .. j*k+k-1`` belong to ``chunk[j]``), for at most ``rounds`` rounds.
    Returns ``(completions resampled, sets still short of k distinct texts, new tokens)``."""
    redone = tokens = 0
    for r in range(1, rounds + 1):
        redo: list[tuple[int, str, int]] = []  # (row, prompt, seed)
        for j, p in enumerate(chunk):
            seen: set[str] = set()
            for n in range(k):
                i = j * k + n
                if s.texts[i] in seen:
                    redo.append((i, p["prompt"], row_seed(seed, p["id"], n, "distinct", r)))
                seen.add(s.texts[i])
        if not redo:
            break
        again = backend.sample([x[1] for x in redo], settings, seed=[x[2] for x in redo])
        tokens += again.new_tokens
        redone += len(redo)
        for m, (i, _, _) in enumerate(redo):
            s.response_ids[i], s.texts[i], s.finished[i] = (
                again.response_ids[m],
                again.texts[m],
                again.finished[m],
            )
    short = sum(len(set(s.texts[j * k : (j + 1) * k])) < k for j in range(len(chunk)))
    return redone, short, tokens


# ----------------------------------------------------------------------------------------------
# `alignloop generate`: K completions per prompt, written as they are produced
# ----------------------------------------------------------------------------------------------

RESERVED = {"prompt_id", "prompt", "completions", "model", "sampling", "id"}


def generate_completions(
    model_id: str,
    prompts: list[dict[str, Any]],
    out: str | Path,
    k: int = 4,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    batch_size: int = 32,
    engine: str = "auto",
    device: str | None = None,
    distinct: int = 0,
    chat_template: str | Path | None = None,
) -> dict[str, Any]:
    """Write one completion-set record per prompt to ``out`` (JSONL, appended as each batch ends).

    A conversational prompt (a list of messages) is sampled from its chat-template rendering with the
    generation prompt (its ids: :func:`alignloop.chat.prompt_ids`; ``chat_template``: a Jinja file replacing
    the tokenizer's); its set keeps the messages, and each completion's text is the assistant's content
    (the continuation without its surrounding whitespace), TRL's conversational completion.

    ``distinct`` > 0: a completion whose text repeats an earlier one of its prompt is sampled again
    (seed ``row_seed(seed, id, j, "distinct", round)``), for at most ``distinct`` rounds; the sets
    still without ``k`` distinct texts are counted in ``short_sets`` (they stay as sampled: label
    import collapses the repeats).

    Prompts already in ``out`` are skipped (resume). Completion ``j`` of prompt ``id`` samples with
    ``row_seed(seed, id, j)``, so a resumed (or ``--limit``-ed) run writes what an uninterrupted one
    would. Completion ids are
    ``f"{prompt_id}-{j}"``. Returns counts and speed: ``prompts``, ``written``, ``skipped_done``,
    ``truncated``, ``unfinished`` (no EOS within max_new_tokens), ``new_tokens``, ``tokens_per_second``
    and, with ``distinct``, ``resampled`` and ``short_sets``.
    """
    from alignloop.chat import prompt_ids, prompt_text, use_chat_template
    from alignloop.models import load_lm
    from alignloop.records import JsonlAppender, is_conversational
    from alignloop.runs import progress, say

    settings = settings or SamplingSettings()
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    from alignloop.generation_backends import make_backend, pick_backend

    pick_backend(settings.backend)  # a backend this machine cannot run: one line before any loading
    model, tokenizer = load_lm(model_id, device=device)
    use_chat_template(tokenizer, chat_template)
    backend = make_backend(settings.backend, model, tokenizer, engine=engine, model_path=str(model_id))
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if not seq2seq:
        from alignloop.models import context_length

        ctx = context_length(model)
        if ctx is not None and settings.max_new_tokens >= ctx:
            raise UserError(
                f"--max-new-tokens {settings.max_new_tokens} does not fit the model's {ctx}-token context",
                fix=f"use at most {ctx - 1} (less leaves room for the prompt)",
            )
    per_batch = max(1, batch_size // k)

    def answer(prompt: Any, text: str) -> str:  # a conversation's completion: the assistant's content
        return text.strip() if is_conversational(prompt) else text

    sampling_record = {**settings.model_dump(), "seed": seed, "k": k, "batch_size": batch_size}
    stats = {
        "prompts": len(prompts),
        "written": 0,
        "skipped_done": 0,
        "truncated": 0,
        "unfinished": 0,
        "new_tokens": 0,
    }
    if distinct:
        stats.update(resampled=0, short_sets=0)
    seconds = 0.0
    with JsonlAppender(out) as sink:
        done = {str(x) for x in sink.done_keys("prompt_id")}
        stats["skipped_done"] = sum(p["id"] in done for p in prompts)
        if stats["skipped_done"]:
            say(f"[generate] {stats['skipped_done']} prompts already in {out}: skipped (resume)")
        todo = [p for p in prompts if p["id"] not in done]
        batches = [todo[i : i + per_batch] for i in range(0, len(todo), per_batch)]
        bar = progress(range(len(todo)), total=len(todo), desc="generate", unit="prompt")
        for chunk in batches:
            if not seq2seq and any(is_conversational(p["prompt"]) for p in chunk):  # the template's ids
                feed = [{**p, "prompt": prompt_ids(tokenizer, p["prompt"])} for p in chunk]
            else:  # text (a seq2seq model's encoder reads a conversation's rendering as text)
                feed = [{**p, "prompt": prompt_text(tokenizer, p["prompt"])} for p in chunk]
            texts = [p["prompt"] for p in feed for _ in range(k)]
            seeds = [row_seed(seed, p["id"], j) for p in chunk for j in range(k)]
            t0 = time.perf_counter()
            s = backend.sample(texts, settings, seed=seeds)
            stats["new_tokens"] += s.new_tokens
            if distinct:
                redone, short, tokens = _resample_repeats(backend, feed, k, s, settings, seed, distinct)
                stats["resampled"] += redone
                stats["short_sets"] += short
                stats["new_tokens"] += tokens
            seconds += time.perf_counter() - t0
            for j, p in enumerate(chunk):
                rows = range(j * k, (j + 1) * k)
                record = {k_: v for k_, v in p.items() if k_ not in RESERVED}
                record.update(
                    prompt_id=p["id"],
                    prompt=p["prompt"],
                    completions=[
                        {
                            "id": f"{p['id']}-{n}",
                            "text": answer(p["prompt"], s.texts[r]),
                            "finished": s.finished[r],
                        }
                        for n, r in enumerate(rows)
                    ],
                    model=model_id,
                    sampling=sampling_record,
                )
                if s.truncated[j * k]:
                    record["prompt_truncated"] = True
                    stats["truncated"] += 1
                stats["unfinished"] += sum(not s.finished[r] for r in rows)
                sink.write(record)
                stats["written"] += 1
                next(bar, None)
    for _ in bar:  # drain (closes the bar)
        pass
    if distinct and stats["short_sets"]:
        say(
            f"[generate] {stats['short_sets']} sets could not be filled with {k} distinct completions "
            f"in {distinct} resampling rounds (label import collapses their repeats)"
        )
    stats["tokens_per_second"] = stats["new_tokens"] / seconds if seconds else 0.0
    if stats["truncated"]:
        limit = prompt_limit(model, tokenizer, settings.max_new_tokens)
        keep = "first" if seq2seq else "last"
        say(
            f"[generate] {stats['truncated']} prompts were longer than {limit} tokens: cut to their {keep} {limit}"
        )
    return stats
