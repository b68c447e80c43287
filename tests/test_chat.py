"""Conversational data (TRL's format) and chat templates (alignloop.chat, records).

The token ids that reach the model for a conversation are those of
``tokenizer.apply_chat_template(...)`` of the same messages; a conversational pairs file means the
same in TRL 1.12's DPOTrainer (0 token mismatches); the world's template renders its own text prompts;
bad input is one clear line naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignloop.errors import UserError
from alignloop.records import Pair, Prompt, read

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "you are helpful ."},
    {"role": "user", "content": "what is a dog ?"},
    {"role": "assistant", "content": "a dog is good ."},
    {"role": "user", "content": "is it hot ?"},
]


@pytest.fixture(scope="module")
def tiny_qwen2_chatml(tmp_path_factory) -> Path:
    """A random-init 2-layer Qwen2 with the world's tokenizer plus ChatML's two special tokens and a
    ChatML template (end-of-turn ``<|im_end|>`` inside the rendered conversation)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from alignloop.models import resolve_model_id

    path = tmp_path_factory.mktemp("qwen2-chatml")
    tok = AutoTokenizer.from_pretrained(resolve_model_id("world:base"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama_bos(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama whose tokenizer adds BOS by itself AND whose ChatML template writes
    ``{{ bos_token }}`` too (as Llama 3's does): the case where a second BOS sneaks in."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from alignloop.models import resolve_model_id

    path = tmp_path_factory.mktemp("llama-bos")
    world = AutoTokenizer.from_pretrained(resolve_model_id("world:base"))
    raw = world.backend_tokenizer
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", world.bos_token_id)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = "{{ bos_token }}" + CHATML
    tok.save_pretrained(path)
    assert tok("a dog").input_ids[0] == tok.bos_token_id
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n: int = 12) -> list[dict]:
    import random

    from alignloop.world import grammar

    rng = random.Random(0)
    out = []
    for p in [p for p in grammar.all_prompts() if p.text.startswith("user : ")][:n]:
        a, b = grammar.sample_response(p, rng)[1], grammar.sample_response(p, rng)[1]
        q = p.text[len("user : ") : -len(" assistant :")]
        turns = [{"role": "system", "content": "be kind ."}] if len(out) % 3 == 0 else []
        out.append({
            "prompt": [*turns, {"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b + " no"}],
        })  # fmt: skip
    return out


# ----------------------------------------------------------------------------- records and errors


@pytest.mark.parametrize(
    "row, says",
    [
        ({"id": "a", "prompt": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"id": "a", "prompt": [{"role": "user", "content": " "}]}, "message 1 (user) has empty content"),
        ({"id": "a", "prompt": CONVERSATION[:3]}, "ends on an assistant turn (message 3)"),
        ({"id": "a", "prompt": []}, "empty message list"),
    ],
)
def test_bad_messages_are_one_line_naming_file_and_line(tmp_path, row, says):
    f = _write(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "user : hi assistant :"}, row])
    with pytest.raises(UserError) as e:
        read(f, Prompt)
    assert f"{f}:2" in e.value.line() and says in e.value.line()
    assert "\n" not in e.value.line()


def test_pairs_cannot_mix_formats(tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": " yes", "rejected": " no"}
    with pytest.raises(UserError, match="mix the formats"):
        read(_write(tmp_path / "p.jsonl", [row]), Pair)


def test_no_template_and_a_raising_template_name_the_line_and_the_option(tmp_path, tiny_gpt2):
    from alignloop.models import load_tokenizer

    tok = load_tokenizer(tiny_gpt2)  # the tests' tiny tokenizer has no chat template
    f = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}, *_pairs(1)])
    with pytest.raises(UserError) as e:
        read(f, Pair, tokenizer=tok)
    assert f"{f}:2" in e.value.line() and "--chat-template FILE" in e.value.line()
    assert read(f, Pair)[1].prompt[-1]["role"] == "user"  # without a tokenizer the messages are kept
    tok.chat_template = "{{ raise_exception('only user turns, please') }}"
    with pytest.raises(UserError) as e:
        read(f, Pair, tokenizer=tok)
    assert f"{f}:2" in e.value.line() and "only user turns, please" in e.value.line()


# ----------------------------------------------------------------------------- the world speaks chat


def test_world_template_renders_the_world_prompts_token_for_token():
    from alignloop.chat import completion_text, prompt_text
    from alignloop.models import load_tokenizer
    from alignloop.world import prompts
    from alignloop.world.prompts import as_messages

    tok = load_tokenizer("world:base")
    texts = [r["prompt"] for split in ("train", "eval", "redteam") for r in prompts(split)]
    chats = [t for t in texts if isinstance(as_messages(t), list)]
    assert len(chats) > 100 and len(chats) == sum(t.startswith("user : ") for t in texts)
    for text in chats:
        msgs = as_messages(text)
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert rendered == prompt_text(tok, msgs) == text
        assert tok(rendered).input_ids == tok(text).input_ids
    # the assistant's answer continues the prompt after one space, as the text path's completions do,
    # and its turn ends with EOS
    assert completion_text(tok, as_messages(chats[0]), "a dog is good .") == " a dog is good .</s>"
    assert as_messages("review : this lamp is") == "review : this lamp is"
    # the shipped tokenizers carry the template `world build` gives the ones it trains
    from alignloop.world.train import CHAT_TEMPLATE, hf_tokenizer, train_tokenizer

    assert hf_tokenizer(train_tokenizer(["user : hi"]), "causal").chat_template == CHAT_TEMPLATE
    for kind in ("base", "summariser", "toxicity"):
        assert load_tokenizer(f"world:{kind}").chat_template == CHAT_TEMPLATE


def test_world_conversational_pairs_end_with_eos_as_the_text_pairs(tmp_path):
    """The world's template ends an assistant turn with EOS: DPO reads a conversational world pair as the
    same ids as the text pair of its rendering (the text path appends EOS; the template writes it), so
    both learn to stop; the template's end-of-turn is what ``turn_end`` reads off it (ChatML's too)."""
    from alignloop.chat import prompt_text, turn_end
    from alignloop.models import load_tokenizer
    from alignloop.offline.dpo import DPOConfig as OurConfig
    from alignloop.offline.dpo import tokenize_pairs

    tok = load_tokenizer("world:base")
    rows = _pairs(8)
    text = [{"prompt": prompt_text(tok, r["prompt"]), **{k: " " + r[k][0]["content"] for k in ("chosen", "rejected")}}
            for r in rows]  # fmt: skip
    chat = tokenize_pairs(
        read(_write(tmp_path / "c.jsonl", rows), Pair, tokenizer=tok), tok, False, OurConfig(), None
    )
    plain = tokenize_pairs(read(_write(tmp_path / "t.jsonl", text), Pair), tok, False, OurConfig(), None)
    assert (chat.prompt_ids, chat.chosen_ids, chat.rejected_ids) == (
        plain.prompt_ids, plain.chosen_ids, plain.rejected_ids)  # fmt: skip
    assert all(ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1] for ids in chat.chosen_ids)
    assert turn_end(tok) == "</s>"
    tok.chat_template = CHATML
    assert turn_end(tok) == "<|im_end|>\n"


def test_a_reward_model_reads_a_finished_chat_turn_with_its_end_of_turn():
    """In a rollout, a reward model (trained on rendered conversations, end-of-turn included) reads a
    finished sample of a conversational prompt with the template's end-of-turn; a truncated sample, a
    text prompt's sample and every text reward (gold judge, Python) read the content."""
    from alignloop.chat import sampled_texts
    from alignloop.reward.functions import Reward

    prompts, texts, finished = ["u : a", "u : b", "text"], [" x", " y", " z"], [True, False, True]
    chat = frozenset({"u : a", "u : b"})
    for kind in ("model", "ensemble"):
        rm = Reward("rm", kind, lambda p, c: [0.0] * len(c))
        assert sampled_texts(rm, prompts, texts, finished, chat, "</s>") == [" x</s>", " y", " z"]
    for kind in ("gold", "python", "http", "classifier"):
        assert sampled_texts(Reward("r", kind, len), prompts, texts, finished, chat, "</s>") == texts
    assert sampled_texts(lambda p, c: c, prompts, texts, finished, chat, "</s>") == texts


def test_world_prompts_conversational_cli(tmp_path, cli):
    out = tmp_path / "p.jsonl"
    assert (
        cli(
            "world",
            "prompts",
            "--split",
            "eval",
            "--n",
            "40",
            "--format",
            "conversational",
            "--out",
            str(out),
        )[0]
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    chat = [r for r in rows if isinstance(r["prompt"], list)]
    assert chat and all(r["prompt"][0]["role"] == "user" for r in chat)
    assert len(read(out, Prompt)) == 40


# ----------------------------------------------------------------------------- TRL 1.12 DPOTrainer


@pytest.mark.parametrize("model", ["tiny_qwen2_chatml", "tiny_llama_bos"])
def test_conversational_pairs_tokenize_as_in_trl(tmp_path, model, request):
    """alignloop's DPO ids of a conversational pairs file == TRL's DPOTrainer's, and == the template's
    (ChatML Qwen2; a Llama whose template and tokenizer both write BOS: one BOS)."""
    tiny_qwen2_chatml = request.getfixturevalue(model)
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignloop.models import load_tokenizer
    from alignloop.offline.dpo import DPOConfig as OurConfig
    from alignloop.offline.dpo import tokenize_pairs

    rows = _pairs(12)
    rows.append({"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "yes ."}],
                 "rejected": [{"role": "assistant", "content": "no ."}]})  # fmt: skip
    f = _write(tmp_path / "pairs.jsonl", rows)
    tok = load_tokenizer(tiny_qwen2_chatml)
    ours = read(f, Pair, tokenizer=tok)
    data = tokenize_pairs(ours, tok, False, OurConfig(), None)  # what alignloop's DPO trains on
    p_ids, c_ids, r_ids = data.prompt_ids, data.chosen_ids, data.rejected_ids
    for i, row in enumerate(rows):  # the ids that reach the model are the template's
        assert p_ids[i] + c_ids[i] == tok.apply_chat_template([*row["prompt"], *row["chosen"]])["input_ids"]
        assert p_ids[i] == tok.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
    assert "<|im_end|>" in ours[0].chosen  # the template's end-of-turn belongs to the completion

    trl_tok = AutoTokenizer.from_pretrained(tiny_qwen2_chatml)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none",
                     max_length=None, dataset_num_proc=None, disable_tqdm=True)  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_qwen2_chatml), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=trl_tok,
    )  # fmt: skip
    trl = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    mismatches = sum(
        (list(a), list(b), list(c)) != (p, q, r)
        for (a, b, c), p, q, r in zip(trl, p_ids, c_ids, r_ids, strict=True)
    )
    assert len(trl) == len(rows) and mismatches == 0


# ----------------------------------------------------------------------------- generate


def test_generate_samples_a_conversation_from_its_template_ids(
    tmp_path, cli, tiny_qwen2_chatml, tiny_llama_bos
):
    """A conversational prompt file samples what its rendering does (same seeds -> same completions):
    the ids that reach the model are ``apply_chat_template(..., add_generation_prompt=True)``'s. The set
    keeps the messages; each completion is the assistant's content."""
    from alignloop.chat import prompt_ids
    from alignloop.models import load_tokenizer
    from alignloop.world.prompts import as_messages

    def generate(model, rows, name):
        f = _write(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / f"{name}-sets.jsonl"
        code, _, err = cli("generate", "--model", str(model), "--prompts", str(f), "--k", "2",
                           "--max-new-tokens", "12", "--out", str(out))  # fmt: skip
        assert code == 0, err
        return [json.loads(x) for x in out.read_text().splitlines()]

    # the world: the conversational path samples exactly the text path's completions
    texts = [
        "user : what is a dog ? assistant :",
        "user : my house is too hot . assistant :",
        "review : this lamp is",
    ]
    plain = generate("world:base", [{"id": str(i), "prompt": t} for i, t in enumerate(texts)], "world-text")
    chat = generate(
        "world:base", [{"id": str(i), "prompt": as_messages(t)} for i, t in enumerate(texts)], "world-chat"
    )
    assert (
        chat[0]["prompt"] == [{"role": "user", "content": "what is a dog ?"}]
        and chat[2]["prompt"] == texts[2]
    )
    for a, b in zip(plain, chat, strict=True):
        strip = isinstance(b["prompt"], list)
        assert [c["text"].strip() if strip else c["text"] for c in a["completions"]] == [
            c["text"] for c in b["completions"]
        ]
    assert any(c["text"].strip() for s in chat for c in s["completions"])

    # a ChatML Qwen2 (multi-turn, system turn): the template's ids, sampled as its rendered text would be
    tok = load_tokenizer(tiny_qwen2_chatml)
    ids = prompt_ids(tok, CONVERSATION)
    assert ids == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    rendered = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert tok(rendered).input_ids == ids  # no BOS here, so the text path reads the same ids
    a = generate(tiny_qwen2_chatml, [{"id": "c", "prompt": rendered}], "qwen-text")[0]
    b = generate(tiny_qwen2_chatml, [{"id": "c", "prompt": CONVERSATION}], "qwen-chat")[0]
    assert [c["text"].strip() for c in a["completions"]] == [c["text"] for c in b["completions"]]
    # a template that writes BOS for a tokenizer that adds one: one BOS reaches the model
    llama = load_tokenizer(tiny_llama_bos)
    ids = prompt_ids(llama, CONVERSATION)
    assert ids == llama.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert ids[0] == llama.bos_token_id != ids[1]


def test_generate_without_a_template_names_the_option(tmp_path, cli, tiny_gpt2):
    f = _write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "the dog"}, {"id": "b", "prompt": CONVERSATION}])
    code, _, err = cli(
        "generate", "--model", str(tiny_gpt2), "--prompts", str(f), "--out", str(tmp_path / "o.jsonl")
    )
    assert code == 2 and f"{f}:2" in err and "--chat-template FILE" in err
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    code, _, err = cli("generate", "--model", str(tiny_gpt2), "--prompts", str(f), "--k", "1", "--max-new-tokens",
                       "3", "--chat-template", str(template), "--out", str(tmp_path / "o.jsonl"))  # fmt: skip
    assert code == 0, err


# ----------------------------------------------------------------------------- reward model, PPO


def test_reward_and_rollout_read_conversations_as_the_template_tokenizes(
    tmp_path, tiny_qwen2_chatml, tiny_llama_bos
):
    """Reward training tokenizes prompt + answer as ``apply_chat_template(prompt + [answer])``; the online
    algorithms' prompts (rl/rollout.py) reach the sampler as ``apply_chat_template(prompt,
    add_generation_prompt=True)``'s ids (ChatML Qwen2; a Llama whose template and tokenizer both write BOS)."""
    from alignloop.generation import encode_prompts
    from alignloop.models import load_tokenizer
    from alignloop.reward.data import read_pairs
    from alignloop.reward.train import encode_groups, load_reward_model
    from alignloop.rl.rollout import read_prompts

    rows = [*_pairs(6), {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "yes ."}],
                         "rejected": [{"role": "assistant", "content": "no ."}]}]  # fmt: skip
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    prompts = _write(
        tmp_path / "prompts.jsonl", [{"id": str(i), "prompt": r["prompt"]} for i, r in enumerate(rows)]
    )
    for path in (tiny_qwen2_chatml, tiny_llama_bos):
        tok = load_tokenizer(path)
        model, rm_tok = load_reward_model(str(path), None, "cpu", True)
        groups = read_pairs(pairs, tokenizer=tok).groups
        got = {tuple(ids) for enc in encode_groups(groups, model, rm_tok, 512) for ids in enc["ids"]}
        want = {
            tuple(tok.apply_chat_template([*r["prompt"], *r[k]])["input_ids"])
            for r in rows
            for k in ("chosen", "rejected")
        }
        assert got == want and len(got) > len(rows)  # (unknown words share one id: some texts coincide)
        sampled = encode_prompts(tok, read_prompts(prompts, tok))
        assert sampled == [
            tok.apply_chat_template(r["prompt"], add_generation_prompt=True)["input_ids"] for r in rows
        ]


def test_world_conversations_through_reward_train_and_ppo(tmp_path, cli):
    """The CLI chain on conversational world data: reward train and DPO on conversational pairs, then PPO
    on conversational prompts (`world prompts --format conversational`) with that reward."""
    pairs = _write(tmp_path / "pairs.jsonl", _pairs(12))
    prompts = tmp_path / "prompts.jsonl"
    assert cli("world", "prompts", "--split", "train", "--n", "16", "--families", "definition,advice",
               "--format", "conversational", "--out", str(prompts))[0] == 0  # fmt: skip
    code, _, err = cli("reward", "train", "--model", "world:base", "--pairs", str(pairs), "--epochs", "1",
                       "--out", str(tmp_path / "rm"))  # fmt: skip
    assert code == 0, err
    assert (
        json.loads((tmp_path / "rm" / "tokenizer_config.json").read_text()).get("chat_template")
        or (tmp_path / "rm" / "chat_template.jinja").is_file()
    )  # the reward model carries the template it read
    code, _, err = cli("dpo", "--policy", "world:base", "--pairs", str(pairs), "--out", str(tmp_path / "dpo"), "--lora",
                       "--set", "max_steps=1", "--set", "batch_size=4", "--set", "heldout_fraction=0.2")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("ppo", "--policy", "world:base", "--reward", str(tmp_path / "rm"), "--prompts", str(prompts),
                       "--out", str(tmp_path / "ppo"), "--lora", "--set", "steps=1", "--set", "batch_size=8",
                       "--set", "minibatch_size=4", "--set", "sampling.max_new_tokens=8")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "ppo" / "metrics.json").read_text())["steps"] == 1


def test_serve_chat_prompt_is_the_template_rendering(tiny_llama_bos):
    """``alignloop serve``'s chat endpoint reads the same ids (one BOS); a template that raises is a UserError
    (the endpoint's 400)."""
    from alignloop.models import load_tokenizer
    from alignloop.serve import ChatMessage, chat_prompt

    tok = load_tokenizer(tiny_llama_bos)
    text = chat_prompt(tok, [ChatMessage(**m) for m in CONVERSATION])
    assert (
        tok(text).input_ids == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    )
    tok.chat_template = "{{ raise_exception('no system turns') }}"
    with pytest.raises(UserError, match="no system turns"):
        chat_prompt(tok, [ChatMessage(**m) for m in CONVERSATION])


def test_label_api_hands_out_a_conversation_as_messages(tmp_path, cli):
    """`label import` keeps a conversational set's messages; the app's JSON API gives them back as the
    prompt (the page shows them as turns: tests/feedback/test_browser_chat.py)."""
    from fastapi.testclient import TestClient

    from alignloop.feedback import store
    from alignloop.feedback.app import create_app

    f = _write(
        tmp_path / "sets.jsonl",
        [{"prompt_id": "a", "prompt": CONVERSATION, "completions": [{"id": "a-0", "text": "yes ."}]}],
    )
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    code, _, err = cli("label", "import", "--db", db, "--completions", str(f), "--per-set", "1")
    assert code == 0, err
    token = store.invite(db, "ada")["token"]
    with TestClient(create_app(db)) as client:
        r = client.post("/api/next", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.json()["assignment"]["prompt"] == CONVERSATION
    store.close_store(db)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_conversations_as_the_text_prompts(tmp_path):
    """Conversational world prompts evaluate exactly as their text: the same samples, gold and KL."""
    from alignloop.evaluation import evaluate_policies
    from alignloop.world import prompts
    from alignloop.world.prompts import as_messages

    text = prompts("eval", n=6, families=["definition", "harmful"])
    chat = [{**r, "prompt": as_messages(r["prompt"])} for r in text]
    assert all(isinstance(r["prompt"], list) for r in chat)
    kw = {
        "samples_per_prompt": 2,
        "max_new_tokens": 12,
        "toxicity_spec": None,
        "n_boot": 50,
        "batch_size": 16,
    }
    a = evaluate_policies({"base": "world:base"}, _write(tmp_path / "text.jsonl", text), **kw)
    b = evaluate_policies({"base": "world:base"}, _write(tmp_path / "chat.jsonl", chat), **kw)
    ma, mb = a["policies"]["base"]["metrics"], b["policies"]["base"]["metrics"]
    assert "gold_score" in ma and ma == mb


def test_reward_score_of_conversations(tmp_path, cli):
    """reward score reads conversational pairs through a chat template (the world's: the same scores as
    the text pairs); without a tokenizer to render them, one line naming --chat-model."""
    from alignloop.world.prompts import as_messages

    chat = _pairs(6)
    text = [{"prompt": f"user : {r['prompt'][-1]['content']} assistant :", "chosen": " " + r["chosen"][0]["content"],
             "rejected": " " + r["rejected"][0]["content"]} for r in chat if len(r["prompt"]) == 1]  # fmt: skip
    chat = [r for r in chat if len(r["prompt"]) == 1]
    assert [as_messages(t["prompt"]) for t in text] == [r["prompt"] for r in chat]
    a, b = _write(tmp_path / "text.jsonl", text), _write(tmp_path / "chat.jsonl", chat)
    code, _, err = cli("reward", "score", "--reward", "world:gold", "--data", str(b))
    assert code == 2 and "--chat-model" in err and len(err.strip().splitlines()) == 1
    ours = cli(
        "reward", "score", "--reward", "world:gold", "--data", str(a), "--out", str(tmp_path / "a.jsonl")
    )
    theirs = cli("reward", "score", "--reward", "world:gold", "--data", str(b), "--chat-model", "world:base",
                 "--out", str(tmp_path / "b.jsonl"))  # fmt: skip
    assert ours[0] == theirs[0] == 0 and ours[1] == theirs[1] and "accuracy=" in ours[1]
    scored = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert scored[0]["prompt"] == chat[0]["prompt"] and "reward_chosen" in scored[0]  # written back as given


# ----------------------------------------------------------------------------- SFT


def test_sft_trains_on_the_assistant_tokens_of_the_template(tmp_path, cli, tiny_qwen2_chatml):
    """A conversational SFT record: the model reads ``apply_chat_template(prompt + answer)``'s ids and the
    loss (labels) covers the assistant turn only (content + end-of-turn), no added EOS, as TRL."""
    from alignloop.models import load_policy
    from alignloop.sft import read_sft_records, tokenize

    answer = [{"role": "assistant", "content": "a dog is good ."}]
    f = _write(
        tmp_path / "sft.jsonl",
        [{"prompt": CONVERSATION, "completion": answer}, {"prompt": "the dog", "completion": " is good"}],
    )
    policy = load_policy(str(tiny_qwen2_chatml), value_head=False, device="cpu")
    tok = policy.tokenizer
    (p, r), (p2, r2) = tokenize(policy, read_sft_records(f, tok), None)[0]
    assert p + r == tok.apply_chat_template([*CONVERSATION, *answer])["input_ids"]
    assert p == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    # the targets: the answer's tokens and the end-of-turn (this word-level tokenizer drops the newline)
    assert r == tok("a dog is good .", add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    assert r2[-1] == tok.eos_token_id  # a text record keeps its EOS
    code, _, err = cli("sft", "--model", str(tiny_qwen2_chatml), "--data", str(f), "--out", str(tmp_path / "o"),
                       "--set", "max_steps=1", "--set", "batch_size=2")  # fmt: skip
    assert code == 0, err
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": CONVERSATION[:3], "completion": answer}])
    code, _, err = cli(
        "sft", "--model", str(tiny_qwen2_chatml), "--data", str(bad), "--out", str(tmp_path / "b")
    )
    assert code == 2 and f"{bad}:1" in err and "ends on an assistant turn" in err


@pytest.mark.parametrize("model", ["tiny_qwen2_chatml", "tiny_llama_bos"])
def test_sft_transcripts_train_on_every_assistant_turn_only(tmp_path, cli, model, request):
    """A multi-turn ``{"messages": [...]}`` transcript: the model reads ``apply_chat_template(messages)``'s
    ids (one BOS), and the loss mask is 1 exactly on the assistant turns' tokens (content + end-of-turn),
    0 on the system/user turns and the assistant headers between them."""
    import torch

    from alignloop.models import load_policy
    from alignloop.sft import read_sft_records, sft_loss, tokenize

    path = request.getfixturevalue(model)
    chat = [*CONVERSATION, {"role": "assistant", "content": "yes , it is hot ."}]  # 2 assistant turns
    f = _write(tmp_path / "sft.jsonl", [{"messages": chat}, {"prompt": "the dog", "completion": " is good"}])
    policy = load_policy(str(path), value_head=False, device="cpu")
    tok = policy.tokenizer
    (p, r, mask), (p2, r2) = tokenize(policy, read_sft_records(f, tok), None)[0]
    assert p + r == tok.apply_chat_template(chat)["input_ids"]
    assert p == tok.apply_chat_template(chat[:2], add_generation_prompt=True)["input_ids"]
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    trained = [t for t, m in zip(r, mask, strict=True) if m]
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert trained == words("a dog is good .") + end + words("yes , it is hot .") + end
    assert len(trained) < len(r) and mask[0] == 1 and mask[-1] == 1  # the user turn between is context
    # the loss is the mean over those tokens only
    loss, n = sft_loss(policy, [(p, r, mask)])
    full = policy.batch([p], [r])
    from alignloop.models import token_logprobs

    logps = token_logprobs(policy.model, full)[0]
    assert n == sum(mask) and torch.allclose(loss, -(logps * torch.tensor(mask)).sum() / n)
    if model == "tiny_qwen2_chatml":  # the command itself once (the tokens above are each model's)
        code, _, err = cli("sft", "--model", str(path), "--data", str(f), "--out", str(tmp_path / "o"),
                           "--set", "max_steps=1", "--set", "batch_size=2")  # fmt: skip
        assert code == 0, err
    only = _write(
        tmp_path / "only.jsonl", [{"messages": CONVERSATION}]
    )  # transcripts alone, ending on a user turn
    only_mask = tokenize(policy, read_sft_records(only, tok), None)[0][0][2]
    assert only_mask[0] == 1 and only_mask[-1] == 0  # the closing user turn is context
    bad = _write(tmp_path / "bad.jsonl", [{"messages": CONVERSATION[:2]}])
    code, _, err = cli("sft", "--model", str(path), "--data", str(bad), "--out", str(tmp_path / "b"))
    assert code == 2 and f"{bad}:1" in err and "no assistant turn" in err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_qwen2_chatml", "tiny_llama_bos"])
def test_chain_generate_label_export_reward_dpo_on_real_architectures(tmp_path, cli, model, request):
    """Llama and Qwen2 (random init, a ChatML template): conversational prompts (one 3-turn) -> generate
    -> rankings -> feedback export (TRL's conversational pairs) -> reward train -> DPO (LoRA). The
    exported pairs reach the model as ``apply_chat_template``'s ids, and TRL's DPOTrainer tokenizes
    them to the same ids (0 mismatches)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignloop.models import load_tokenizer
    from alignloop.offline.dpo import DPOConfig as OurConfig
    from alignloop.offline.dpo import tokenize_pairs

    path = str(request.getfixturevalue(model))
    prompts = [CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": "is it hot ?"}]]
    f = _write(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)])
    sets = tmp_path / "sets.jsonl"
    code, _, err = cli("generate", "--model", path, "--prompts", str(f), "--k", "3", "--max-new-tokens", "6",
                       "--distinct", "2", "--out", str(sets))  # fmt: skip
    assert code == 0, err
    got = [json.loads(x) for x in sets.read_text().splitlines()]
    assert [s["prompt"] for s in got] == prompts  # the sets keep the messages
    rankings = _write(tmp_path / "rankings.jsonl", [
        {"set_id": s["prompt_id"], "labeller": "ada", "ranks": {c["id"]: i + 1 for i, c in enumerate(s["completions"])}}
        for s in got
    ])  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    code, _, err = cli(
        "feedback", "export", "--sets", str(sets), "--rankings", str(rankings), "--out", str(pairs)
    )
    assert code == 0, err
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert rows and all(isinstance(r["prompt"], list) and r["chosen"][0]["role"] == "assistant" for r in rows)
    code, _, err = cli("reward", "train", "--model", path, "--pairs", str(pairs), "--epochs", "1",
                       "--out", str(tmp_path / "rm"))  # fmt: skip
    assert code == 0, err
    code, _, err = cli("dpo", "--policy", path, "--pairs", str(pairs), "--out", str(tmp_path / "dpo"), "--lora",
                       "--set", "max_steps=1", "--set", "batch_size=2")  # fmt: skip
    assert code == 0, err

    tok = load_tokenizer(path)
    data = tokenize_pairs(read(pairs, Pair, tokenizer=tok), tok, False, OurConfig(), None)
    for i, row in enumerate(rows):  # the template applied: its ids, one BOS
        assert (
            data.prompt_ids[i]
            == tok.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        )
        assert (
            data.prompt_ids[i] + data.chosen_ids[i]
            == tok.apply_chat_template([*row["prompt"], *row["chosen"]])["input_ids"]
        )
    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none",
                     max_length=None, dataset_num_proc=None, disable_tqdm=True)  # fmt: skip
    trl_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                         train_dataset=Dataset.from_list(trl_rows), processing_class=AutoTokenizer.from_pretrained(path))  # fmt: skip
    trl = [
        (list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset
    ]
    ours = list(zip(data.prompt_ids, data.chosen_ids, data.rejected_ids, strict=True))
    assert len(trl) == len(rows) and sum(a != (p, c, r) for a, (p, c, r) in zip(trl, ours, strict=True)) == 0


def test_demo_recipe_conversational_prompts(tmp_path, cli):
    """`alignloop demo --format conversational` = the demo with prompts.format=conversational: the world's
    chat prompts are message lists (reviews and summaries stay text); a wrong value is one line."""
    from alignloop.loop import RECIPES, load_recipe, stage_prompts

    recipe = load_recipe(RECIPES / "demo.yaml", ["prompts.format=conversational", "prompts.n_train=40"])
    paths = stage_prompts(recipe, tmp_path / "prompts", resume=False)
    rows = read(paths["train"], Prompt)
    chats = [r for r in rows if isinstance(r.prompt, list)]
    assert chats and all(len(r.prompt) == 1 and r.prompt[0]["role"] == "user" for r in chats)
    assert all(not r.prompt.startswith("user :") for r in rows if isinstance(r.prompt, str))  # continuations
    code, _, err = cli("demo", "--format", "chat", "--out", str(tmp_path / "d"))
    assert code == 2 and "--format" in err
