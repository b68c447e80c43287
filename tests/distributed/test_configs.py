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
