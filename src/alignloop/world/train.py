"""Build the world's tiny models from scratch (``alignloop world build``).

1. A word-level tokenizer trained with ``tokenizers`` on the world lexicon (three saved variants:
   causal (no added tokens), seq2seq (``$A </s>``), classifier (``<s> $A </s>``)).
2. ``base``: a GPT-2-style causal instruct model, trained on :func:`corpus.base_examples` with the
   loss on target tokens only (the (A)/(B) answer token weighted higher).
3. ``summariser``: a T5-style seq2seq model on :func:`corpus.summary_examples`.
4. ``toxicity``: a RoBERTa-style classifier (``id2label {0: nothate, 1: hate}``).
5. ``judge``: the world's AI judge, the base fine-tuned on (A)/(B) questions only
   (:func:`corpus.judge_examples`), some of whose answers depend on the prompt.

Budgets are steps, not wall time; one training loop (AdamW, linear warm-up, cosine decay) for every
model. Everything is seeded, so the same seed and thread count rebuild the same weights.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

from alignloop.models import make_optimizer
from alignloop.runs import progress, say, write_json_atomic
from alignloop.world import corpus

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
PAD, BOS, EOS, UNK, MASK = range(5)


@dataclass(frozen=True)
class BuildConfig:
    """Step budgets and sizes of ``world build``; ``QUICK`` is the reduced build for tests."""

    seed: int = 0
    base_steps: int = 4500
    base_batch: int = 32
    base_lr: float = 2e-3
    base_layers: int = 3
    base_width: int = 128
    base_positions: int = 256
    # the tanh GELU of GPT-2 ("gelu_new") as one native kernel: the same function, ~1.25x faster
    # base training on this CPU (measured 1 thread, 4 interleaved runs of 50 steps)
    base_activation: str = "gelu_pytorch_tanh"
    judge_steps: int = 1000
    judge_batch: int = 32
    judge_lr: float = 5e-4
    judge_warmup: int = 50
    summariser_steps: int = 2000
    summariser_batch: int = 32
    summariser_lr: float = 2e-3
    classifier_steps: int = 400
    classifier_batch: int = 64
    classifier_lr: float = 1e-3
    warmup: int = 100
    threads: int = 1  # tiny models: one intra-op thread is as fast alone and ~10x faster on a busy box


QUICK = BuildConfig(
    base_steps=12,
    base_batch=8,
    judge_steps=4,
    judge_batch=8,
    judge_warmup=1,
    summariser_steps=6,
    summariser_batch=8,
    classifier_steps=6,
    classifier_batch=16,
    warmup=2,
)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]) -> Tokenizer:
    """A word-level tokenizer: lower-case words and punctuation; ``(A)``/``(B)`` stay one token each."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace("(a)", " (A) "), normalizers.Replace("(b)", " (B) ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\([AB]\)|[.,?!:;'()\"]"), "isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by single spaces
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(5))
    return tok


# The world's chat template: messages in the world's own form, ``user : what is a dog ? assistant :``
# (roles and contents joined by single spaces, the generation prompt `` assistant :``), so
# ``[{"role": "user", "content": Q}]`` renders exactly the text prompt ``user : Q assistant :`` and the
# assistant's content continues it after one space, as the text path's completions do. An assistant turn
# ends with the EOS token (``... assistant : a dog is an animal .</s>``, as Llama-2's and Zephyr's
# templates end theirs): the end-of-turn a conversational completion is trained on (TRL's reading), the
# same token the text path appends to a completion, so the model learns to stop in both.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %} {% endif %}{{ m['role'] }} : {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)


def hf_tokenizer(tok: Tokenizer, kind: str) -> PreTrainedTokenizerFast:
    """The HF tokenizer of one model kind: ``causal``, ``seq2seq`` or ``classifier``."""
    tok = Tokenizer.from_str(tok.to_str())
    if kind == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    elif kind == "classifier":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", BOS), ("</s>", EOS)],
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        padding_side="left" if kind == "causal" else "right",
        model_max_length=256,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


# ----------------------------------------------------------------------------- the training loop
def _batches(lengths: list[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar lengths (sorted within chunks of 50 batches), in random order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    out = []
    chunk = batch * 50
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda i: lengths[i])
        out += [part[i : i + batch] for i in range(0, len(part), batch) if len(part[i : i + batch]) == batch]
    rng.shuffle(out)
    return out


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def train_loop(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    steps: int,
    lr: float,
    warmup: int,
    desc: str,
) -> dict[str, float]:
    """AdamW (weight decay 0.01, betas 0.9/0.98) with linear warm-up and cosine decay, grad clip 1.0."""
    opt = make_optimizer(list(model.parameters()), lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, min(warmup, steps), steps)
    model.train()
    t0, tokens, recent = time.time(), 0, []
    for _ in progress(range(steps), desc=desc, unit="step"):
        b = next(batches)
        loss = loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(b["attention_mask"].sum()) + int(b.get("decoder_tokens", torch.tensor(0)))
        recent = (recent + [loss.item()])[-50:]
    model.eval()
    dt = time.time() - t0
    return {"steps": steps, "seconds": round(dt, 1), "tokens_per_s": round(tokens / max(dt, 1e-9)),
            "final_loss": round(sum(recent) / max(len(recent), 1), 4)}  # fmt: skip


def causal_loss(
    model: torch.nn.Module, b: dict[str, torch.Tensor], norm: float | None = None
) -> torch.Tensor:
    """Weighted next-token loss ``sum_t w_t * CE(logits_{t-1}, x_t) / norm`` (w = 0 on the prompt).

    ``norm`` should be a constant (the expected ``sum_t w_t`` of a batch): dividing by each batch's
    own weight sum gives a token in a batch of short examples more weight than one in a batch of
    long examples, and our batches are grouped by length. That tilted the base model toward short
    responses: the one-sentence toxic answer of harmful/benign/myth came out ~1.5x as often as in
    the mixture (0.21 vs 0.10 in harmful) and the long toxic summary less often. ``None`` divides
    by the batch's weight sum.
    """
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["input_ids"][:, 1:], reduction="none")
    w = b["weights"][:, 1:]
    return (ce * w).sum() / (w.sum() if norm is None else norm)


def _forever(make: Callable[[int], list[dict[str, torch.Tensor]]]) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


# ----------------------------------------------------------------------------- the four models
def _causal_batches(
    tok: PreTrainedTokenizerFast,
    examples: list[tuple[str, str, float]],
    batch: int,
    positions: int,
    seed: int,
) -> tuple[Iterator[dict[str, torch.Tensor]], float]:
    """Endless length-grouped batches of ``input + " " + target + EOS`` with the loss weight on the
    target (and EOS) only, and the expected weight sum of a batch (:func:`causal_loss`'s ``norm``)."""
    ins = tok([x for x, _, _ in examples], add_special_tokens=False)["input_ids"]
    tgs = tok([" " + y for _, y, _ in examples], add_special_tokens=False)["input_ids"]
    seqs, weights = [], []
    for i, t, (_, _, w) in zip(ins, tgs, examples, strict=True):
        seqs.append((i + t + [EOS])[-positions:])
        weights.append(([0.0] * len(i) + [w] * (len(t) + 1))[-positions:])
    lengths = [len(s) for s in seqs]

    def make(epoch: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(seed * 1000 + epoch)
        out_ = []
        for ix in _batches(lengths, batch, rng):
            ids = _pad([seqs[i] for i in ix], PAD)
            out_.append({"input_ids": ids, "attention_mask": _pad([[1] * lengths[i] for i in ix], 0),
                         "weights": _pad([weights[i] for i in ix], 0.0).float()})  # fmt: skip
        return out_

    return _forever(make), batch * sum(sum(w[1:]) for w in weights) / len(weights)


def _save_causal(model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, out: Path) -> None:
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(out)
    tok.save_pretrained(out)


def train_base(tok: PreTrainedTokenizerFast, cfg: BuildConfig, out: Path) -> dict[str, Any]:
    """GPT-2-style causal instruct base on the task mixture; saved to ``out``."""
    torch.manual_seed(cfg.seed)
    examples = corpus.base_examples(cfg.base_steps * cfg.base_batch, seed=cfg.seed)
    batches, norm = _causal_batches(tok, examples, cfg.base_batch, cfg.base_positions, cfg.seed)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.base_positions, n_embd=cfg.base_width, n_layer=cfg.base_layers,
        n_head=4, n_inner=4 * cfg.base_width, activation_function=cfg.base_activation, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    # every target token weighs the same whatever its batch (see causal_loss)
    stats = train_loop(
        model, batches, partial(causal_loss, norm=norm), cfg.base_steps, cfg.base_lr, cfg.warmup, "world base"
    )
    _save_causal(model, tok, out)
    return {**stats, "parameters": sum(p.numel() for p in model.parameters())}


def train_judge(cfg: BuildConfig, base: Path, out: Path) -> dict[str, Any]:
    """The world's AI judge: the base model at ``base`` fine-tuned on (A)/(B) questions only
    (:func:`corpus.judge_examples`, some of them prompt-dependent), with the base's own tokenizer (its
    word ids); saved to ``out``.

    A separate model, so the base's response mixture (what PPO starts from and every calibrated
    number rests on) does not move; the base still answers (A)/(B) questions as it always did.
    """
    torch.manual_seed(cfg.seed + 3)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    examples = corpus.judge_examples(cfg.judge_steps * cfg.judge_batch, seed=cfg.seed + 3)
    batches, norm = _causal_batches(tok, examples, cfg.judge_batch, cfg.base_positions, cfg.seed + 3)
    model = GPT2LMHeadModel.from_pretrained(base)
    stats = train_loop(
        model,
        batches,
        partial(causal_loss, norm=norm),
        cfg.judge_steps,
        cfg.judge_lr,
        cfg.judge_warmup,
        "world judge",
    )
    _save_causal(model, tok, out)
    return {**stats, "parameters": sum(p.numel() for p in model.parameters()), "from": base.name}


def train_summariser(tok: PreTrainedTokenizerFast, cfg: BuildConfig, out: Path) -> dict[str, Any]:
    """T5-style seq2seq summariser on the summary mixture; saved to ``out``."""
    torch.manual_seed(cfg.seed + 1)
    examples = corpus.summary_examples(cfg.summariser_steps * cfg.summariser_batch, seed=cfg.seed + 1)
    ins = tok([x for x, _ in examples])["input_ids"]
    tgs = tok([y for _, y in examples])["input_ids"]
    lengths = [len(i) for i in ins]

    def make(epoch: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(cfg.seed * 1000 + 1 + epoch)
        res = []
        for ix in _batches(lengths, cfg.summariser_batch, rng):
            labels = _pad([tgs[i] for i in ix], -100)
            res.append({"input_ids": _pad([ins[i] for i in ix], PAD),
                        "attention_mask": _pad([[1] * lengths[i] for i in ix], 0),
                        "labels": labels, "decoder_tokens": (labels != -100).sum()})  # fmt: skip
        return res

    config = T5Config(
        vocab_size=len(tok), d_model=128, d_ff=256, d_kv=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config)

    def loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    stats = train_loop(
        model, _forever(make), loss, cfg.summariser_steps, cfg.summariser_lr, cfg.warmup, "world summariser"
    )
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.decoder_start_token_id = PAD
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {**stats, "parameters": sum(p.numel() for p in model.parameters())}


def train_classifier(tok: PreTrainedTokenizerFast, cfg: BuildConfig, out: Path) -> dict[str, Any]:
    """RoBERTa-style toxicity classifier (0 = nothate, 1 = hate); saved to ``out``."""
    torch.manual_seed(cfg.seed + 2)
    examples = corpus.toxicity_examples(cfg.classifier_steps * cfg.classifier_batch, seed=cfg.seed + 2)
    ins = tok([x for x, _ in examples], truncation=True, max_length=128)["input_ids"]
    ys = [y for _, y in examples]
    lengths = [len(i) for i in ins]

    def make(epoch: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(cfg.seed * 1000 + 2 + epoch)
        return [{"input_ids": _pad([ins[i] for i in ix], PAD), "attention_mask": _pad([[1] * lengths[i] for i in ix], 0),
                 "labels": torch.tensor([ys[i] for i in ix])} for ix in _batches(lengths, cfg.classifier_batch, rng)]  # fmt: skip

    config = RobertaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=132, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, num_labels=2, id2label={0: "nothate", 1: "hate"},
        label2id={"nothate": 0, "hate": 1}, problem_type="single_label_classification",
    )  # fmt: skip
    model = RobertaForSequenceClassification(config)

    def loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    stats = train_loop(
        model, _forever(make), loss, cfg.classifier_steps, cfg.classifier_lr, cfg.warmup, "world toxicity"
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {**stats, "parameters": sum(p.numel() for p in model.parameters())}


MODELS = ("base", "judge", "summariser", "toxicity")


def build(
    out: str | Path,
    seed: int = 0,
    quick: bool = False,
    config: BuildConfig | None = None,
    only: tuple[str, ...] = MODELS,
) -> dict[str, Any]:
    """Train the world models ``only`` names (default all) into ``out/<name>``; writes ``out/build.json``.

    The judge is fine-tuned from ``out/base``: built in the same call, or already there (``only=("judge",)``
    rebuilds the judge of an existing world; its entry replaces the old one in ``build.json``).
    """
    from alignloop.errors import UserError

    cfg = replace(config or (QUICK if quick else BuildConfig()), seed=seed)
    out = Path(out)
    unknown = [m for m in only if m not in MODELS]
    if unknown or not only:
        raise UserError(f"unknown world model(s) {unknown or only}", fix=f"choose from {', '.join(MODELS)}")
    if "judge" in only and "base" not in only and not (out / "base" / "config.json").is_file():
        raise UserError(
            "the judge is fine-tuned from the world's base, and there is none", str(out / "base"),
            "build the base too (drop --only), or copy a built world's base/ there",
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(out, cfg, t0, only)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, cfg: BuildConfig, t0: float, only: tuple[str, ...]) -> dict[str, Any]:
    raw = train_tokenizer(corpus.tokenizer_texts())
    previous = out / "build.json"
    report: dict[str, Any] = (
        json.loads(previous.read_text()) if set(only) != set(MODELS) and previous.is_file() else {}
    )
    report.update({
        "config": asdict(cfg),
        "vocab_size": raw.get_vocab_size(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "built": [m for m in MODELS if m in only],
    })  # fmt: skip
    say(f"[world build] tokenizer: {raw.get_vocab_size()} words")
    if "base" in only:
        report["base"] = train_base(hf_tokenizer(raw, "causal"), cfg, out / "base")
        say(f"[world build] base: {report['base']}")
    if "judge" in only:
        report["judge"] = train_judge(cfg, out / "base", out / "judge")
        say(f"[world build] judge: {report['judge']}")
    if "summariser" in only:
        report["summariser"] = train_summariser(hf_tokenizer(raw, "seq2seq"), cfg, out / "summariser")
        say(f"[world build] summariser: {report['summariser']}")
    if "toxicity" in only:
        report["toxicity"] = train_classifier(hf_tokenizer(raw, "classifier"), cfg, out / "toxicity")
        say(f"[world build] toxicity: {report['toxicity']}")
    report["seconds"] = round(time.time() - t0, 1)
    report["load_average_at_end"] = list(os.getloadavg())
    report["megabytes"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 2)
    write_json_atomic(out / "build.json", report)
    return report
