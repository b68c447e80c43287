"""What alignloop writes means the same in TRL 1.12 (the text convention, TRL's: the full text
is exactly ``prompt + completion``).

On every pair of a demo-sized export (the demo recipe up to export) and of an HH-RLHF-format import
(read with a GPT-2-style byte-level BPE tokenizer, where a leading space is a different token),
TRL's ``DPOTrainer`` and ``RewardTrainer`` tokenize each pair exactly as alignloop does, and TRL's
precomputed reference log-probs equal alignloop's (``dpo.precompute_reference``) on 100 pairs.
The same pairs in the old convention (no leading space) do not: the check can fail.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from alignloop.records import Pair, full_text, read
from alignloop.world import grammar

pytest.importorskip("trl")


def _trl_dpo(model_dir: Path, pairs: list[dict], ref_pairs: int, tmp: Path):
    """TRL's DPOTrainer tokenization of every pair, and its precomputed reference log-probs of the first
    ``ref_pairs`` pairs: ``(rows of prompt/chosen/rejected ids, ref chosen, ref rejected)``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(tmp / "trl-dpo"), bf16=False, use_cpu=True, report_to="none", precompute_ref_log_probs=True,
        precompute_ref_batch_size=16, max_length=None, dataset_num_proc=None, disable_tqdm=True,
    )  # fmt: skip
    cols = ["prompt", "chosen", "rejected"]
    subset = Dataset.from_list([{k: p[k] for k in cols} for p in pairs[:ref_pairs]])
    trainer = DPOTrainer(model=model, args=args, train_dataset=subset, processing_class=tok)
    ref = trainer.train_dataset
    every = trainer._prepare_dataset(
        Dataset.from_list([{k: p[k] for k in cols} for p in pairs]), tok, args, "all"
    )
    ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in every]
    return ids, torch.tensor(ref["ref_chosen_logps"]), torch.tensor(ref["ref_rejected_logps"])


def _trl_reward(model_dir: Path, pairs: list[dict], tmp: Path) -> list[tuple[list[int], list[int]]]:
    """TRL's RewardTrainer tokenization: ``(chosen ids, rejected ids)`` of every pair."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp / "trl-rm"), bf16=False, use_cpu=True, report_to="none", max_length=None,
        disable_tqdm=True,
    )  # fmt: skip
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    return [(r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]


def _alignloop(model_dir: Path, pairs: list[dict], ref_pairs: int):
    """alignloop's DPO tokenization (``models.encode_pairs``), its reward-model text tokens
    (``full_text`` through ``reward.functions.encode_texts``) and its DPO reference log-probs."""
    from alignloop.models import encode_pairs, load_policy
    from alignloop.offline.dpo import DPOConfig, PairData, precompute_reference
    from alignloop.reward.functions import encode_texts

    policy = load_policy(str(model_dir), value_head=False, device="cpu")
    tok = policy.tokenizer
    prompts = [p["prompt"] for p in pairs]
    p_ids, c_ids = encode_pairs(tok, prompts, [p["chosen"] for p in pairs], False)
    _, r_ids = encode_pairs(tok, prompts, [p["rejected"] for p in pairs], False)
    texts = [full_text(p["prompt"], p[k]) for p in pairs for k in ("chosen", "rejected")]
    rm = encode_texts(policy.model, tok, texts, max_length=10_000)
    n = ref_pairs
    data = PairData(p_ids[:n], c_ids[:n], r_ids[:n], torch.ones(n), torch.ones(n))
    c, r = precompute_reference(policy.model, policy, data, DPOConfig(eval_batch_size=16), "reference")
    return list(zip(p_ids, c_ids, r_ids, strict=True)), list(zip(rm[0::2], rm[1::2], strict=True)), c, r, tok


def _mismatches(model_dir: Path, pairs: list[dict], tmp: Path, ref_pairs: int = 100, ours_read=None) -> dict:
    """Pairs whose TRL token ids differ from alignloop's, and the largest reference log-prob gap.
    ``ours_read``: the pairs as alignloop reads the same file (default: ``pairs``)."""
    trl_ids, trl_c, trl_r = _trl_dpo(model_dir, pairs, ref_pairs, tmp)
    trl_rm = _trl_reward(model_dir, pairs, tmp)
    ours, ours_rm, c, r, tok = _alignloop(model_dir, ours_read or pairs, ref_pairs)
    eos = tok.eos_token_id
    return {
        "dpo": sum(tuple(map(list, a)) != tuple(map(list, b)) for a, b in zip(trl_ids, ours, strict=True)),
        # TRL's reward model reads the text + EOS; alignloop's reads the text (its last token)
        "reward": sum(
            (list(a), list(b)) != (x + [eos], y + [eos])
            for (a, b), (x, y) in zip(trl_rm, ours_rm, strict=True)
        ),
        "ref_logp_max_diff": float(torch.cat([(trl_c - c).abs(), (trl_r - r).abs()]).max()),
    }


def _old_file(pairs: list[dict], path: Path) -> tuple[list[dict], list[dict]]:
    """The same pairs as the old convention wrote them (completions without their leading space):
    ``(the file's rows, as TRL reads them; the rows as alignloop reads the file: converted)``."""
    old = [{**p, "chosen": p["chosen"].lstrip(), "rejected": p["rejected"].lstrip()} for p in pairs]
    path.write_text("".join(json.dumps(p) + "\n" for p in old))
    return old, [p.model_dump() for p in read(path, Pair)]


# ----------------------------------------------------------------------------- the demo's export


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    """The demo recipe up to export (300 prompts x 4 completions, three simulated labellers)."""
    from alignloop.loop import RECIPES, run_recipe

    out = tmp_path_factory.mktemp("demo")
    run_recipe(RECIPES / "demo.yaml", out=out, overrides=["stages=[prompts, generate, label, export]"])
    return out


@pytest.mark.slow
def test_demo_export_means_the_same_in_trl(demo_export, tmp_path):
    from alignloop.models import resolve_model_id

    pairs = [p.model_dump() for p in read(demo_export / "export" / "pairs.jsonl", Pair)]
    assert len(pairs) > 500  # demo-sized (845 pairs from 300 sets of 4 once repeats are collapsed)
    base = Path(resolve_model_id("world:base"))
    got = _mismatches(base, pairs, tmp_path)
    print(f"demo export, {len(pairs)} pairs: {got}")
    assert got["dpo"] == 0 and got["reward"] == 0
    assert got["ref_logp_max_diff"] < 1e-4
    # no duplicate work for labellers, and no pair that teaches nothing
    assert sum(p["chosen"] == p["rejected"] for p in pairs) == 0
    shown = [json.loads(x) for x in (demo_export / "label" / "sets.jsonl").read_text().splitlines()]
    texts = [[c["text"] for c in s["completions"]] for s in shown]
    assert sum(len(t) - len(set(t)) for t in texts) == 0  # the share of repeats labellers saw: 0
    metrics = json.loads((demo_export / "label" / "metrics.json").read_text())
    generated = [json.loads(x) for x in (demo_export / "generate" / "sets.jsonl").read_text().splitlines()]
    repeats = sum(len(s["completions"]) - len({c["text"] for c in s["completions"]}) for s in generated)
    assert metrics["collapsed"] == repeats > 0  # the number collapsed is reported
    # an old-convention file (no leading spaces) meant something else in TRL: the check above can fail
    raw, ours = _old_file(pairs, tmp_path / "old.jsonl")
    old = _mismatches(base, raw, tmp_path, ref_pairs=16, ours_read=ours)
    print(f"the same pairs in the old convention: {old}")
    assert old["dpo"] > 0 and old["reward"] > 0


# ----------------------------------------------------------------------------- an HH-RLHF import


@pytest.fixture(scope="module")
def bpe_gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with a GPT-2-style byte-level BPE tokenizer (``Ġword``: the leading space
    is part of the token), trained here on the world's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("bpe-gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sentences = list(grammar.language())
    texts = [
        f"Human: {p.text.capitalize()}\n\nAssistant: {s.capitalize()}"
        for p, s in zip(grammar.all_prompts(), sentences, strict=False)
    ]
    texts += sentences
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _hh_file(path: Path, n: int) -> Path:
    """``n`` HH-RLHF lines (``{"chosen", "rejected"}`` transcripts) about the world's prompts."""
    rng = random.Random(0)
    lines = []
    for p in grammar.all_prompts()[:n]:
        a, b = grammar.sample_response(p, rng)[1], grammar.sample_response(p, rng)[1]
        if a == b:
            continue
        conv = f"\n\nHuman: {p.text.capitalize()}\n\nAssistant:"
        lines.append({"chosen": f"{conv} {a.capitalize()}", "rejected": f"{conv} {b.capitalize()}"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.slow
def test_hh_rlhf_import_means_the_same_in_trl(bpe_gpt2, tmp_path, cli):
    src = _hh_file(tmp_path / "hh.jsonl", 220)
    code, out, err = cli("feedback", "import", "--in", src, "--out", tmp_path / "pairs.jsonl")
    assert code == 0, err
    pairs = [p.model_dump() for p in read(tmp_path / "pairs.jsonl", Pair)]
    assert len(pairs) >= 150 and all(p["chosen"].startswith(" ") for p in pairs)
    got = _mismatches(bpe_gpt2, pairs, tmp_path)
    print(f"HH-RLHF import, {len(pairs)} pairs: {got}")
    assert got["dpo"] == 0 and got["reward"] == 0
    assert got["ref_logp_max_diff"] < 1e-4
    raw, ours = _old_file(pairs, tmp_path / "old.jsonl")  # replies stripped, as the import did before
    old = _mismatches(bpe_gpt2, raw, tmp_path, ref_pairs=8, ours_read=ours)
    print(f"the same import with stripped replies: {old}")
    assert old["dpo"] > 0 and old["reward"] > 0
