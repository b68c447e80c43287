"""The few things a trainer needs to run as one of several processes (``accelerate launch``, torchrun).

Data parallel in alignloop is the same recipe in every trainer:

1. every optimizer step has one *global* batch, a pure function of ``(seed, step)`` -- identical on
   every process, so a resumed run and a run with another process count see the same data;
2. process ``rank`` of ``world`` takes ``batch[rank::world]`` (:func:`shard`);
3. the local loss is ``sum(local per-item losses) * world / global item count``: DDP *averages* the
   processes' gradients, so the result is the gradient of the global batch mean (a 2-process run
   equals a 1-process run at the same global batch);
4. metrics are sums all-reduced over the processes (:func:`all_reduce_sum`) before they are divided;
5. only the main process writes files (``alignloop.runs`` already writes only on rank 0); the
   others wait (:func:`barrier`) where they read what it wrote.

Nothing here needs a process group: with one process every function is the identity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the process that writes files: rank 0 (also before the process group exists, from
    the launcher's ``RANK``), or the only one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This process's share of a global batch: every ``world``-th item from ``rank`` on.

    Strided (not contiguous) so that a batch smaller than ``world * k`` still spreads evenly.
    """
    if rank is None or world is None:
        rank, world = rank_world()
    return list(items[rank::world])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes (a new CPU tensor; ``t`` itself with one process).

    gloo reduces CPU tensors and NCCL only CUDA ones, so the tensor travels on the backend's device.
    """
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    x = t.detach().to(device).clone()
    dist.all_reduce(x)
    return x.cpu()


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` with one process)."""
    import torch.distributed as dist

    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def fsdp_requested() -> bool:
    """An FSDP accelerate config was launched (``ACCELERATE_USE_FSDP=true``, e.g. configs/accelerate/fsdp.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def make_accelerator(device: str | None = None, **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` for ``device`` (None: cuda if present, else cpu).

    ``cpu=True`` on a CPU matters: under ``accelerate launch --multi_gpu`` it selects MULTI_CPU
    (gloo DDP); without it accelerate would fall back to no distribution at all and the processes
    would train separately.

    Under an FSDP config alignloop shards the model itself (:func:`shard_model`, FSDP2 ``fully_shard``) on
    CPUs (gloo) and GPUs (NCCL) alike: accelerate is asked for the plain process group only (with
    ``ACCELERATE_USE_FSDP`` it reports DistributedType.NO on a CPU and each process would train alone).
    """
    from accelerate import Accelerator

    from alignloop.errors import UserError
    from alignloop.models import pick_device

    on_cpu = pick_device(device).type == "cpu"
    if on_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UserError(
            "DeepSpeed was asked for (accelerate config) but this machine has no GPU",
            fix="on CPUs use configs/accelerate/fsdp.yaml (FSDP2, sharded) or cpu.yaml (DDP)",
        )
    if fsdp_requested() and os.environ.get("FSDP_VERSION", "2") != "2":
        raise UserError(
            f"FSDP version {os.environ['FSDP_VERSION']} was asked for; alignloop shards with FSDP2 only",
            fix="set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)",
        )
    hidden = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP",) if k in os.environ}
    try:
        accelerator = Accelerator(cpu=on_cpu, **kwargs)
    finally:
        os.environ.update(hidden)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:  # each process would train alone
        raise UserError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): they would each train alone",
            fix="on CPUs launch with `accelerate launch --multi_gpu --num_processes N`, "
            "--config_file configs/accelerate/fsdp.yaml, or torchrun (see docs/distributed.md)",
        )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        # DeepSpeed wants a micro-batch size for its bookkeeping and would read it from a prepared
        # DataLoader; alignloop's trainers batch by themselves, so any number does: 1
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    return accelerator


def fsdp2(accelerator: Any) -> bool:
    """True when this run shards with FSDP2 (:func:`shard_model`): an FSDP config and several processes."""
    return fsdp_requested() and accelerator.num_processes > 1


def shard_model(model: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
    """FSDP2 in place: ``fully_shard`` each transformer block, then the whole model.

    The blocks are the modules whose class the model names in ``_no_split_modules`` (``GPT2Block``,
    ``LlamaDecoderLayer``, ``T5Block``, ...; PEFT forwards the attribute to its base). Each process
    then keeps ``1/world`` of every parameter (a DTensor shard) with its gradient and optimizer
    state; a block's full weights exist only during its forward/backward. Build the optimizer
    after this call (it must see the sharded parameters). Mixed precision: bf16 compute with fp32
    reduction when the launcher asked for bf16 on a GPU, fp32 otherwise (never bf16 on a CPU).

    ``frozen`` (a model that only runs forwards: PPO's reference, a reward model): the whole model also
    reshards after its forward. FSDP2 otherwise keeps the root's own weights (embeddings, final norm,
    head) whole from a forward until the backward that never comes (measured on a 2 x 64 GPT-2, where
    the embeddings are most of the weights: a frozen copy held 0.985x of its bytes on each of 2
    processes instead of 0.500x; benchmarks/fsdp_memory.py --ppo).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    on_gpu = next(model.parameters()).device.type == "cuda"
    if on_gpu and os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True if frozen else None)
    return model


def is_sharded(model: Any) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def prepare(accelerator: Any, model: Any, optimizer: Any) -> tuple[Any, Any]:
    """``accelerator.prepare(model, optimizer)`` (DDP, DeepSpeed), or both as they are when the
    model is FSDP2-sharded already (FSDP2 reduces gradients itself)."""
    if is_sharded(model):
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def full_state_dict(model: Any, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of an FSDP2-sharded ``model``, whole, on the CPU (names as ``model.state_dict()``).

    A collective: every process calls it. The main process gets the dict (the others an empty one,
    enough to save the model), or with ``everywhere`` every process gets it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    full = get_model_state_dict(model, options=options)
    return {k: v.cpu() for k, v in full.items()} if everywhere else full


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The whole AdamW state of an FSDP2-sharded model, keyed by parameter name, on the CPU (a
    collective: every process calls it). For trainers whose checkpoints hold whole tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: Any, optimizer: Any, weights: dict[str, torch.Tensor], optim: dict[str, Any]
) -> None:
    """Put whole trainable ``weights`` (names as ``model.named_parameters()``) and a whole optimizer state
    (:func:`full_optimizer_state`) into an FSDP2-sharded model and its optimizer: each process keeps its
    shard. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)


def save_sharded_step(
    root: Path,
    step: int,
    model: Any,
    optimizer: Any,
    info: dict[str, Any],
    keep: int,
    write_extra: Any = None,
) -> Path:
    """A checkpoint of an FSDP2 run, ``root/step-<step>``: every process writes its own shard of the
    trainable weights and optimizer state (``torch.distributed.checkpoint``) and its RNG states into one
    hidden folder, then the main process seals it as every checkpoint is sealed (sizes and SHA-256 in
    ``state.json``, fsync, one rename; :mod:`alignloop.checkpoints`). Every process calls it.

    ``model`` may be a plain module holding sharded ones (PPO: the policy and its value head).
    ``write_extra(folder)``: the main process writes more files into the folder before it is sealed
    (PPO: the schedule and loop state)."""
    import random

    import torch.distributed.checkpoint as dcp

    from alignloop import checkpoints

    final = checkpoints.step_folder(root, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main():
        checkpoints.fresh_folder(final)
    barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp))
    rank = rank_world()[0]
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng-{rank}.pt")
    if write_extra is not None and is_main():
        write_extra(tmp)
    barrier()
    if is_main():
        checkpoints.seal_folder(tmp, final, {**info, "processes": rank_world()[1]})
        checkpoints.prune(root, keep)
    barrier()
    return final


def load_sharded_step(folder: Path, model: Any, optimizer: Any) -> None:
    """Restore what :func:`save_sharded_step` wrote into the sharded ``model`` and ``optimizer`` (the
    same number of processes) and this process's RNG states."""
    import random

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from alignloop.errors import UserError

    saved = json.loads((folder / "state.json").read_text()).get("processes")
    if saved != rank_world()[1]:
        raise UserError(
            f"the checkpoint was written by {saved} FSDP processes, this run has {rank_world()[1]}",
            str(folder),
            f"resume with {saved} processes, or run without --resume",
        )
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(ignore_frozen_params=True),
    )
    rng = torch.load(folder / f"rng-{rank_world()[0]}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])


def _sharded_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optimizer": osd}


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` so their global L2 norm is at most ``max_norm``; return that norm.

    ``torch.nn.utils.clip_grad_norm_`` when no gradient is sharded. Otherwise (FSDP2 parameters next to
    plain ones, e.g. PPO's value head) ``||g|| = sqrt(||g_sharded||^2 + ||g_plain||^2)``, where the
    sharded part's norm is a DTensor reduced over the processes, and every gradient is multiplied by
    ``min(1, max_norm / (||g|| + 1e-6))`` as torch does.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    sq = torch.nn.utils.get_total_norm(sharded).full_tensor().double() ** 2
    if plain:
        sq = sq + torch.nn.utils.get_total_norm(plain).double() ** 2
    total = sq.sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return total.float()


def model_state_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, frozen: Sequence[torch.nn.Module] = ()
) -> dict[str, int]:
    """Bytes THIS process holds for the parameters, their gradients and the optimizer state, read from
    the tensors (a DTensor counts its local shard only); with ``frozen`` models (PPO's reference and reward
    model) their parameters too, under ``frozen`` and in ``total``."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = [p for p in model.parameters()]
    out = {
        "parameters": sum(local(p).numel() * local(p).element_size() for p in params),
        "gradients": sum(
            local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None
        ),
        "optimizer": sum(
            local(v).numel() * local(v).element_size()
            for st in optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ),
    }
    out["frozen"] = sum(local(p).numel() * local(p).element_size() for m in frozen for p in m.parameters())
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"] + out["frozen"]
    return out


def uses_sharded_weights(accelerator: Any) -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP: no process holds every weight, so reading or saving the
    model needs a gather (``accelerator.get_state_dict``), and sampling needs the full weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP or fsdp2(accelerator):
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


def trainable_state(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights by parameter name, complete, as CPU tensors (for checkpoints).

    Under ZeRO-3 / FSDP every process must call this (the weights are gathered); the result is
    meant for the main process. Otherwise it is a plain copy of the unwrapped model's weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    if is_sharded(unwrapped):
        full = full_state_dict(unwrapped)
        return {n: full[n] for n in names if n in full}
    if uses_sharded_weights(accelerator):
        full = accelerator.get_state_dict(model)
        return {n: full[n].detach().cpu().clone() for n in names if n in full}
    params = dict(unwrapped.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}
