"""Where completions come from: the model being trained (transformers) or a vLLM engine (GPU, optional).

Two backends with one face -- ``sample(prompts, settings, seed) -> Samples`` and
``load_weights(model)`` -- chosen by name::

    backend = make_backend("auto", model, tokenizer)          # vLLM if installed and on a GPU, else transformers
    backend.load_weights(policy.model)                         # PPO: after each update (no-op for transformers)
    samples = backend.sample(prompts, cfg.sampling, seed=[row_seed(step_seed, j) for j in rows])

- ``transformers`` (the default, always there): :func:`alignloop.generation.sample` on the live model,
  our KV-cache loop or ``model.generate`` (``engine``), unchanged -- per-row seeds, same tokens whatever
  the batch. Under DeepSpeed ZeRO-3 or FSDP no process holds every weight, so it samples inside
  :func:`gathered_for_generation`, which gathers them for the duration of the call.
- ``vllm`` (``pip install 'alignloop[vllm]'``, CUDA, causal models): a vLLM engine with its own copy of
  the weights, refreshed by ``load_weights`` after each update (LoRA merged on the fly). Faster for
  long completions and big batches; its sampling uses vLLM's per-request seeds, so its tokens are not
  the transformers backend's tokens for the same seed.

When vLLM is not installed nothing imports it: ``auto`` picks transformers and only an explicit
``vllm`` is an error (one line saying how to install it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from alignloop.errors import UserError
from alignloop.generation import Samples, SamplingSettings, row_seed, sample

BACKENDS = ("auto", "transformers", "vllm")


class Backend(Protocol):
    """What PPO, evaluation and ``alignloop generate`` need from a sampler."""

    name: str

    def sample(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        settings: SamplingSettings,
        seed: int | Sequence[int],
    ) -> Samples: ...

    def load_weights(self, model: Any) -> None: ...


def vllm_available() -> bool:
    """vLLM is installed (found without importing it) and a CUDA device is there for it."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pick_backend(name: str = "auto") -> str:
    """``auto`` -> ``vllm`` when :func:`vllm_available`, else ``transformers``; other names are checked."""
    if name not in BACKENDS:
        raise UserError(f"unknown generation backend {name!r}", fix=f"use one of: {', '.join(BACKENDS)}")
    if name == "auto":
        return "vllm" if vllm_available() else "transformers"
    if name == "vllm":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "the vllm generation backend needs a CUDA GPU and this machine has none",
                fix="use sampling.backend=transformers (or auto); on a GPU machine: pip install 'alignloop[vllm]'",
            )
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError(
            "the vllm generation backend needs vLLM, which is not installed",
            fix="pip install 'alignloop[vllm]' (CUDA only), or use the transformers backend",
        )
    return name


def make_backend(
    name: str,
    model: Any,
    tokenizer: Any,
    *,
    accelerator: Any = None,
    engine: str = "auto",
    model_path: str | None = None,
    vllm_options: dict[str, Any] | None = None,
) -> Backend:
    """The backend ``name`` (see :func:`pick_backend`) for ``model``.

    Args:
        model: the policy being trained (a PeftModel or plain HF model, possibly wrapped by accelerate).
        accelerator: the run's ``Accelerator``; needed to gather ZeRO-3 / FSDP weights for sampling.
        engine: the transformers backend's engine: ``torch`` (our loop), ``hf`` (``generate``), ``auto``.
        model_path: the folder vLLM loads (default: the model's ``name_or_path``).
        vllm_options: extra ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``tensor_parallel_size``...).
    """
    chosen = pick_backend(name)
    if chosen == "transformers":
        return TransformersBackend(model, tokenizer, accelerator, engine)
    return VLLMBackend(model, tokenizer, model_path, vllm_options or {})


# ----------------------------------------------------------------------------------------------
# transformers: the live model
# ----------------------------------------------------------------------------------------------


class TransformersBackend:
    """:func:`alignloop.generation.sample` on the model being trained (its weights gathered if sharded)."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, accelerator: Any = None, engine: str = "auto") -> None:
        self.model, self.tokenizer, self.accelerator, self.engine = model, tokenizer, accelerator, engine

    def sample(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        settings: SamplingSettings,
        seed: int | Sequence[int],
    ) -> Samples:
        with gathered_for_generation(self.accelerator, self.model) as model:
            return sample(model, self.tokenizer, prompts, settings, seed=seed, engine=self.engine)

    def load_weights(self, model: Any) -> None:
        """Nothing to do: it samples from the live model."""


@contextmanager
def gathered_for_generation(accelerator: Any, model: Any) -> Iterator[Any]:
    """The bare model with every weight present, for the duration of the block.

    - DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` over all parameters (read-only: nothing
      is written back), on every process at once -- each must enter the block.
    - FSDP: FSDP1 ``summon_full_params(writeback=False)``; FSDP2 ``unshard()`` every sharded module,
      ``reshard()`` after.
    - anything else (one process, DDP, ZeRO-1/2): the unwrapped model as it is, no copy.

    Gathering needs the memory of the full model on each GPU for as long as the block lasts: the
    memory table in docs/distributed.md counts it.
    """
    if accelerator is None:
        yield model
        return
    from alignloop.distributed import uses_sharded_weights

    if not uses_sharded_weights(accelerator):
        yield accelerator.unwrap_model(model)
        return
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield accelerator.unwrap_model(model)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):  # FSDP1
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield model.module
        return
    with fsdp2_unsharded(model):  # FSDP2 (fully_shard)
        yield model


@contextmanager
def fsdp2_unsharded(model: Any) -> Iterator[Any]:
    """An FSDP2-sharded model with every weight whole, for a block of forwards that involve NO collective.

    Each process samples its own rows and stops when they end, so the processes run different numbers
    of forwards: a forward that all-gathered would hang. Inside, every sharded module is unsharded once
    (one all-gather each, on every process) and told not to reshard after its forward; after the block
    each is resharded and the training default is back (blocks reshard after forward, the root does not).
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield model
        return
    root = sharded[0] if sharded[0] is model else model
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(m is not root, recurse=False)


# ----------------------------------------------------------------------------------------------
# vLLM: a separate engine, refreshed with the trained weights
# ----------------------------------------------------------------------------------------------


class VLLMBackend:
    """Sampling on a ``vllm.LLM`` engine (GPU); ``load_weights`` pushes the policy's current weights into it.

    Untested in alignloop's CI (no GPU there): the code follows vLLM's offline ``LLM.generate`` API with
    token-id prompts and per-request seeds.
    """

    name = "vllm"

    def __init__(self, model: Any, tokenizer: Any, model_path: str | None, options: dict[str, Any]) -> None:
        from vllm import LLM  # only here: the import is the optional extra

        base = _bare(model)
        if getattr(base.config, "is_encoder_decoder", False):
            raise UserError(
                "the vllm backend samples from causal models only",
                fix="use the transformers backend for seq2seq",
            )
        path = (
            model_path or getattr(base.config, "_name_or_path", None) or getattr(base, "name_or_path", None)
        )
        if not path:
            raise UserError("the vllm backend needs the model's folder or hub id", fix="pass model_path")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.llm = LLM(model=str(path), tokenizer=str(path), **{"gpu_memory_utilization": 0.3, **options})

    def sample(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        settings: SamplingSettings,
        seed: int | Sequence[int],
    ) -> Samples:
        from vllm import SamplingParams

        from alignloop.generation import continuation_texts, encode_prompts

        ids = encode_prompts(self.tokenizer, prompts)
        seeds = (
            [row_seed(seed, i) for i in range(len(ids))] if isinstance(seed, int) else [int(s) for s in seed]
        )
        greedy = not settings.do_sample or settings.temperature <= 0
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else settings.temperature,
                top_p=1.0 if greedy else settings.top_p,
                top_k=-1 if greedy or settings.top_k <= 0 else settings.top_k,
                max_tokens=settings.max_new_tokens,
                ignore_eos=not settings.stop_at_eos,
                seed=s & 0x7FFFFFFF,
            )
            for s in seeds
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        responses, finished = [], []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            done = c.finish_reason == "stop"
            if done and self.eos is not None and (not toks or toks[-1] != self.eos):
                toks.append(self.eos)  # PPO scores the EOS token's log-prob too
            responses.append(toks)
            finished.append(done)
        texts = continuation_texts(self.tokenizer, ids, responses, seq2seq=False)
        return Samples(ids, responses, texts, finished, [False] * len(ids))

    def load_weights(self, model: Any) -> None:
        """Copy the policy's weights (LoRA merged in) into the engine's model."""
        weights = merged_state_dict(model)
        engine_model = _vllm_model(self.llm)
        engine_model.load_weights(weights.items())


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The base model's weights by HF name, with a LoRA adapter merged in (``W + B A * alpha / r``).

    A PeftModel is merged, read and unmerged again (training goes on with the adapter); the PEFT
    prefixes (``base_model.model.``, ``.base_layer``) are dropped and the adapter's own tensors skipped.
    """
    base = _bare(model)
    if not hasattr(base, "merge_adapter"):
        return {k: v.detach() for k, v in base.state_dict().items()}
    base.merge_adapter()
    try:
        out = {}
        for k, v in base.get_base_model().state_dict().items():
            if "lora_" in k or "modules_to_save" in k:
                continue
            out[k.replace(".base_layer", "")] = v.detach().clone()
        return out
    finally:
        base.unmerge_adapter()


def _bare(model: Any) -> Any:
    """The model inside DDP / accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _vllm_model(llm: Any) -> Any:
    """The ``nn.Module`` a single-GPU vLLM engine runs (its location moved between vLLM releases)."""
    paths = (
        ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),
        ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
    )
    for path in paths:
        obj = llm
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    raise UserError(
        "cannot reach the model inside this vLLM version's engine to load new weights",
        fix="use the transformers generation backend, or a vLLM release with a single-process engine",
    )
