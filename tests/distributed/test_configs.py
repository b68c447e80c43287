"""The shipped accelerate configs load with accelerate's own reader and say what their names promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {
    "cpu.yaml": (
        "MULTI_GPU",
        None,
        "no",
    ),  # on a CPU the trainers turn it into gloo DDP (tested in test_sft.py)
    "ddp.yaml": ("MULTI_GPU", None, "bf16"),
    "zero2.yaml": ("DEEPSPEED", 2, "bf16"),
    "zero3.yaml": ("DEEPSPEED", 3, "bf16"),
    "zero3-offload.yaml": ("DEEPSPEED", 3, "bf16"),
    "fsdp.yaml": ("FSDP", None, "bf16"),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    kind, stage, precision = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type.value == kind
    assert (
        str(cfg.mixed_precision.value if hasattr(cfg.mixed_precision, "value") else cfg.mixed_precision)
        == precision
    )
    if kind == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == stage
        assert ds["gradient_accumulation_steps"] == 1  # the trainers accumulate themselves
        offload = name == "zero3-offload.yaml"
        assert (ds["offload_optimizer_device"] == "cpu") is offload
        assert (ds["offload_param_device"] == "cpu") is offload
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # whole HF weights when saving


@pytest.mark.slow
def test_fsdp_config_on_a_cpu_is_one_clear_error(tiny_gpt2, tmp_path):
    """Without this check accelerate quietly runs plain DDP (or the loaders fail on meta tensors)."""
    import subprocess

    import torch
    from dist_data import ranked_pairs, write_jsonl
    from launch import accelerate_bin, environment, free_port

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ranked_pairs(8))
    res = subprocess.run(
        [
            accelerate_bin(), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "alignloop", "-q", "reward", "train",
            "--model", str(tiny_gpt2), "--pairs", str(pairs), "--out", str(tmp_path / "rm"),
        ],
        env=environment(tmp_path / "audit"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("alignloop: error:")]
    assert errors and all("FSDP was asked for" in e and "configs/accelerate/cpu.yaml" in e for e in errors)
    # the launcher reports the failed workers with its own traceback; none comes from alignloop's code
    assert not [line for line in res.stderr.splitlines() if "File" in line and "/alignloop/" in line]
