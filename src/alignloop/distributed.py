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

import os
from collections.abc import Sequence
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


def make_accelerator(device: str | None = None, **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` for ``device`` (None: cuda if present, else cpu).

    ``cpu=True`` on a CPU matters: under ``accelerate launch --multi_gpu`` it selects MULTI_CPU
    (gloo DDP); without it accelerate would fall back to no distribution at all and the processes
    would train separately.
    """
    from accelerate import Accelerator

    from alignloop.errors import UserError
    from alignloop.models import pick_device

    on_cpu = pick_device(device).type == "cpu"
    sharded = [
        k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"
    ]
    if on_cpu and sharded:  # accelerate would quietly fall back to DDP (or fail deep inside the loaders)
        raise UserError(
            f"{sharded[0]} was asked for (accelerate config) but this machine has no GPU",
            fix="alignloop runs FSDP and DeepSpeed on GPUs; on CPUs use configs/accelerate/cpu.yaml (DDP)",
        )
    accelerator = Accelerator(cpu=on_cpu, **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:  # each process would train alone
        raise UserError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): they would each train alone",
            fix="on CPUs launch with `accelerate launch --multi_gpu --num_processes N` or torchrun; "
            "FSDP and DeepSpeed need GPUs (see docs/distributed.md)",
        )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        # DeepSpeed wants a micro-batch size for its bookkeeping and would read it from a prepared
        # DataLoader; alignloop's trainers batch by themselves, so any number does: 1
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    return accelerator


def uses_sharded_weights(accelerator: Any) -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP: no process holds every weight, so reading or saving the
    model needs a gather (``accelerator.get_state_dict``), and sampling needs the full weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
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
    if uses_sharded_weights(accelerator):
        full = accelerator.get_state_dict(model)
        return {n: full[n].detach().cpu().clone() for n in names if n in full}
    params = dict(unwrapped.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}
