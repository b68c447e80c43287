"""Training-state bytes per process, DDP vs FSDP2, at GPT-2-small size (124M, random init, full fine-tuning).

Run on two processes (gloo on a CPU, NCCL on GPUs), once per engine, each in its own launch::

    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --engine ddp
    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --engine fsdp2

Each process builds the model, wraps it as alignloop's trainers do (DDP: torch's wrapper, what
``accelerator.prepare`` gives on a CPU; FSDP2: ``alignloop.distributed.shard_model``), takes one AdamW
step (``alignloop.models.make_optimizer``) on a short batch, and reads the bytes it holds for the
parameters, their gradients and the optimizer state from the tensors themselves
(``alignloop.distributed.model_state_bytes``: a DTensor counts its local shard). Rank 0 prints one
JSON line; the ratio of the two lines is the claim (docs/distributed.md). Not RSS: RSS also holds
activations, the allocator's slack and the imports, which are the same for both engines.

``--ppo``: PPO's model state instead (what ``alignloop ppo`` reports as ``model_state_bytes``): the policy
with a value head (``Linear(hidden, 1)``, whole on every process, as in alignloop), its frozen reference
(a copy of the policy) and a frozen reward model of the same size (``GPT2ForSequenceClassification``,
scoring under ``torch.inference_mode`` as alignloop's rewards do). DDP holds both frozen models whole on
every process; FSDP2 shards them (``rl/rollout.shard_frozen_and_trained``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["ddp", "fsdp2"], required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--ppo", action="store_true", help="+ value head, frozen reference, frozen reward model")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from alignloop.distributed import model_state_bytes, shard_model
    from alignloop.models import make_optimizer

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every process
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64))
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    frozen: list[torch.nn.Module] = []
    head = None
    if args.ppo:
        head = torch.nn.Linear(args.width, 1)
        cfg.num_labels, cfg.pad_token_id = 1, 0
        frozen = [
            copy.deepcopy(model).requires_grad_(False),
            GPT2ForSequenceClassification(cfg).requires_grad_(False),
        ]
    if args.engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        shard_model(model)
        for m in frozen:
            shard_model(m, frozen=True)
    trainable = torch.nn.ModuleDict({"model": model, **({"value_head": head} if head is not None else {})})
    optimizer = make_optimizer([p for p in trainable.parameters() if p.requires_grad], 1e-5, 0.0)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(rank))
    out = model(input_ids=ids, labels=ids, output_hidden_states=head is not None)
    loss = out.loss
    if head is not None:  # the value head on the detached trunk, the frozen models' forwards
        loss = loss + head(out.hidden_states[-1].detach()).pow(2).mean()
        with torch.no_grad():
            frozen[0](input_ids=ids)
        with torch.inference_mode():
            frozen[1](input_ids=ids)
    loss.backward()
    optimizer.step()  # AdamW's two moments exist from here on
    held = model_state_bytes(trainable, optimizer, frozen)
    if rank == 0:
        print(json.dumps({"engine": args.engine, "processes": world, "n_parameters": n_params, **held}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
