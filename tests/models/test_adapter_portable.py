"""Adapter folders name a base that resolves away from the run that trained them: copied elsewhere with
the training folder removed, they load with ``peft.AutoPeftModelForCausalLM`` and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignloop.models import LoraSettings, load_lm, portable_base
from alignloop.offline.dpo import DPOConfig, train_dpo
from alignloop.world import model_path

PAIRS = [
    {"prompt": "user : hi assistant :", "chosen": " hello , how can i help ?", "rejected": " stop whining , you fool ."},
    {"prompt": "user : is the fan on ? assistant :", "chosen": " yes , it is on .", "rejected": " only an idiot would ask that ."},
]  # fmt: skip


def train_adapter(policy: str, tmp_path, name: str):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 4))
    out = tmp_path / name
    cfg = DPOConfig(max_steps=2, batch_size=4, lora=LoraSettings(r=2), heldout_fraction=0.0)
    train_dpo(policy, pairs, out, cfg)
    return out


def copy_adapter_and_remove_run(run, dest):
    dest.mkdir()
    for f in run.iterdir():
        if f.name.startswith(("adapter_", "tokenizer")):
            shutil.copy(f, dest / f.name)
    shutil.rmtree(run)
    return dest


def generate_with_peft(folder) -> str:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("user : hi assistant :", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_world_adapter_copied_elsewhere_loads_in_peft_and_alignloop(tmp_path, monkeypatch):
    run = train_adapter("world:base", tmp_path, "run")
    recorded = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(model_path("base").resolve())  # the installed world model, not the run
    moved = copy_adapter_and_remove_run(run, tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    text = generate_with_peft(moved)
    model, tok = load_lm(moved)
    ids = tok(["user : hi assistant :"], return_tensors="pt")
    with torch.no_grad():
        ours = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(ours[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == text

    # on a machine where alignloop is installed elsewhere, alignloop maps the world folder to its own copy
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/another/site-packages/alignloop/world/shipped/base"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    model2, _ = load_lm(moved)
    with torch.no_grad():
        assert torch.equal(
            model2.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id), ours
        )


def test_local_base_given_relatively_is_recorded_absolute(tiny_gpt2, tmp_path, monkeypatch):
    shutil.copytree(tiny_gpt2, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    run = train_adapter("base", tmp_path, "run")  # a relative folder, as a user types it
    recorded = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "base").resolve())
    moved = copy_adapter_and_remove_run(run, tmp_path / "elsewhere")
    monkeypatch.chdir(moved)
    generate_with_peft(moved)


@pytest.mark.parametrize("given", ["gpt2", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_are_recorded_as_given(given):
    assert portable_base(given) == given
