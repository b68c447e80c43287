"""The model layer: load a policy (causal or seq2seq), wrap it with LoRA, attach a value head,
get a frozen reference without a second copy, and compute per-token log-probs in one forward.

Public API (other stages build on these names)::

    resolve_model_id(model_id) -> str              "world:base" -> shipped folder; a run folder with model/
                                                    -> that; else unchanged
    pick_device(device=None) -> torch.device        cuda if present, else cpu
    default_dtype(device) -> torch.dtype            fp32 on CPU (never bf16), bf16 on CUDA that has it
    configure_threads() -> int                      torch.set_num_threads from the cores we may use
    is_seq2seq(model_id) -> bool
    is_adapter_folder(model_id) -> bool             a PEFT adapter folder (adapter_config.json)
    portable_base(model_id) -> str                  the base an adapter records: hub id as given, folder absolute
    load_tokenizer(model_id) -> tokenizer           pad token set; causal -> padding_side="left"
    load_lm(model_id, dtype=None, device=None, merge_adapter=True) -> (model, tokenizer)
    LoraSettings(Config); add_lora(model, settings) -> PeftModel; lora_target_modules(model)
    load_policy(model_id, lora=None, value_head=True, critic=None, ...) -> Policy
    Policy: .model .tokenizer .is_seq2seq .value_head .critic .reference
            .forward(batch) -> PolicyOutput(logprobs, values, entropy)   ONE forward of the trunk
            .reference_logprobs(batch) -> (B, R)   (LoRA: adapter disabled; trained adapter: its frozen copy;
                                                    no LoRA: a frozen full copy)
            .batch(prompt_ids, response_ids) -> Batch; .save(dir); .trainable_parameters()
    Batch; build_batch(prompt_ids, response_ids, pad_id, seq2seq=False, decoder_start_id=None) -> Batch
    position_ids_from_mask(attention_mask) -> (B, T)   positions from each row's first real token
    encode_pairs(tokenizer, prompts, responses, seq2seq, add_eos=True) -> (prompt_ids, response_ids)
    forward_batch(model, batch, value_head=None, temperature=1.0) -> PolicyOutput
    token_logprobs(model, batch) -> (B, R);  sequence_logprobs(model, batch) -> (B,)
    parameter_storage_bytes(*modules) -> int        bytes of distinct parameter storage

Layout of a causal batch (prompt left-padded, response right-padded, P and R columns)::

    input_ids      [pad pad p1 p2 p3 | r1 r2 r3 pad]     (B, P + R)
    attention_mask [ 0   0  1  1  1  |  1  1  1   0 ]
    position_ids   [ 0   0  0  1  2  |  3  4  5   5 ]    so padding never shifts positions
    response_mask                    [  1  1  1   0 ]     (B, R)

The logits at column ``P - 1 + t`` predict response token ``t``; the value head reads the
hidden state at that same column (the state *before* token t is emitted).

A seq2seq batch has the prompt as encoder input (right-padded) and the decoder input
``[start, r1, r2, ...]`` predicting ``[r1, r2, r3, ...]``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignloop.config import Config
from alignloop.errors import UserError

WORLD_PREFIX = "world:"
VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_FILE = "alignloop_policy.json"
REFERENCE_ADAPTER = "reference"

# Encoders whose every position sees the whole sequence: unfit as a per-token critic.
BIDIRECTIONAL = {
    "bert",
    "roberta",
    "xlm-roberta",
    "deberta",
    "deberta-v2",
    "distilbert",
    "electra",
    "albert",
    "mpnet",
    "camembert",
    "modernbert",
}

# LoRA targets per architecture (config.model_type). Anything else gets peft's "all-linear".
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "mt5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


# ----------------------------------------------------------------------------------------------
# Names, devices, dtypes
# ----------------------------------------------------------------------------------------------


def resolve_model_id(model_id: str | Path) -> str:
    """``"world:base"`` | ``"world:judge"`` | ``"world:summariser"`` | ``"world:toxicity"`` -> the shipped folder.

    A local folder or a hub id is returned unchanged (as a string).
    """
    model_id = str(model_id)
    if model_id.startswith(WORLD_PREFIX):
        name = model_id[len(WORLD_PREFIX) :]
        try:
            from alignloop.world import model_path
        except ImportError:
            raise UserError(
                f"model {model_id!r} needs the embedded world, which is not installed",
                fix="pass a hub id or a local model folder",
            ) from None
        try:
            return str(model_path(name))
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise UserError(
                f"unknown world model {model_id!r} ({e})",
                fix="world:base, world:judge, world:summariser or world:toxicity",
            ) from None
    folder = Path(model_id)
    if folder.is_dir() and not _is_model_folder(folder) and _is_model_folder(folder / "model"):
        return str(folder / "model")  # a run folder whose stage saved its model in model/
    from alignloop.hub import require_hub

    require_hub(model_id, "model")  # one line at once when it is not cached and the hub is out of reach
    return model_id


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~10x slower there), bf16 on CUDA devices that support it."""
    device = pick_device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def configure_threads() -> int:
    """Set torch's intra-op threads: the cores this process may use, split across local ranks.

    ``ALIGNLOOP_THREADS`` / ``OMP_NUM_THREADS`` win when set. On an oversubscribed machine (1-minute
    load average above the core count) one thread: OpenMP workers spin-waiting for cores made the
    world base model's sampling 20x slower with 2 threads than with 1 here (102 vs 2158 tok/s at
    load 12 on 2 cores). Returns the thread count.
    """
    explicit = os.environ.get("ALIGNLOOP_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        n = int(explicit)
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        n = max(1, cores // max(1, local))
        try:
            if os.getloadavg()[0] > (os.cpu_count() or cores):
                n = 1
        except OSError:
            pass
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def is_adapter_folder(model_id: str | Path) -> bool:
    return (Path(resolve_model_id(model_id)) / "adapter_config.json").is_file()


def _adapter_base(folder: str) -> str:
    """The base an adapter folder names. A world model's folder that is not where the adapter says (the
    adapter was trained where alignloop is installed elsewhere) is this installation's copy of it."""
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UserError("adapter has no base_model_name_or_path", f"{folder}/adapter_config.json")
    parts = Path(base).parts
    if not Path(base).exists() and len(parts) >= 3 and parts[-3:-1] == ("world", "shipped"):
        return resolve_model_id(WORLD_PREFIX + parts[-1])
    return str(base)


def portable_base(model_id: str | Path) -> str:
    """What an adapter trained on ``model_id`` records as ``base_model_name_or_path``: a name that
    ``from_pretrained`` resolves away from the training run's folder and working directory.

    A hub id as given (``"gpt2"``); a local folder (a run folder: its ``model/``) as an absolute path;
    a world model (``"world:base"``) as its folder in the installed alignloop package (absolute, and
    mapped to this installation's copy when alignloop loads it elsewhere: :func:`_adapter_base`); an
    adapter folder: the base it records itself.
    """
    if not str(model_id).startswith(WORLD_PREFIX) and not Path(model_id).exists():
        return str(model_id)  # a hub id, as given (recording it needs no hub access)
    path = resolve_model_id(model_id)
    if (Path(path) / "adapter_config.json").is_file():
        return _adapter_base(path)
    return str(Path(path).resolve()) if Path(path).is_dir() else str(model_id)


def _load_config(model_id: str) -> Any:
    from transformers import AutoConfig

    if is_adapter_folder(model_id):
        model_id = _adapter_base(model_id)
    try:
        return AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load model {model_id!r} ({str(e).splitlines()[0]})",
            fix="pass a local HF model folder or a hub id (no network here: hub ids must be cached)",
        ) from None


def is_seq2seq(model_id: str | Path) -> bool:
    """True for encoder-decoder models (T5, BART, ...), by their config."""
    cfg = _load_config(resolve_model_id(model_id))
    return bool(getattr(cfg, "is_encoder_decoder", False))


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow, or None (relative positions, e.g. T5)."""
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def load_tokenizer(model_id: str | Path) -> Any:
    """The model's tokenizer with a pad token (EOS when it has none); causal -> left padding."""
    from transformers import AutoTokenizer

    model_id = resolve_model_id(model_id)
    seq2seq = is_seq2seq(model_id)
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        if not is_adapter_folder(model_id):
            raise UserError(f"cannot load the tokenizer of {model_id!r} ({str(e).splitlines()[0]})") from None
        tok = AutoTokenizer.from_pretrained(_adapter_base(model_id))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer of {model_id!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if seq2seq else "left"
    return tok


def _auto_class(seq2seq: bool) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM


def fuse_activations(model: nn.Module) -> int:
    """Swap transformers' tanh-GELU written as a Python formula (``gelu_new``: GPT-2, FLAN-T5's gated
    GELU; ``gelu_fast``) for torch's one-kernel ``gelu(approximate="tanh")``: the same function (outputs
    differ by float rounding, <= 5e-7), but one op instead of eight, and the backward saves one tensor
    instead of eight, so training steps of small models are ~1.5x faster and lighter. The config is
    untouched: a saved model is what it was. Returns how many activations were swapped."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def _from_pretrained(model_id: str, seq2seq: bool, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model load is noise beside ours
    try:
        model = _auto_class(seq2seq).from_pretrained(model_id, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load model {model_id!r} ({str(e).splitlines()[0]})",
            fix="pass a local HF model folder or a hub id (no network here: hub ids must be cached)",
        ) from None
    fuse_activations(model)
    return model.to(device)


def load_lm(
    model_id: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    merge_adapter: bool = True,
) -> tuple[Any, Any]:
    """Load a causal or seq2seq LM (auto-detected) and its tokenizer, in eval mode.

    A PEFT adapter folder loads its base model with the adapter; ``merge_adapter`` folds it in
    (a plain model, fastest for inference).
    """
    model_id = resolve_model_id(model_id)
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    configure_threads()
    seq2seq = is_seq2seq(model_id)
    tokenizer = load_tokenizer(model_id)
    if is_adapter_folder(model_id):
        from peft import PeftModel

        base = _from_pretrained(resolve_model_id(_adapter_base(model_id)), seq2seq, dtype, device)
        model = PeftModel.from_pretrained(base, model_id)
        if merge_adapter:
            model = model.merge_and_unload()
    else:
        model = _from_pretrained(model_id, seq2seq, dtype, device)
    _sync_pad_id(model, tokenizer)
    from alignloop.offline.ilql import is_ilql_folder, load_decoder

    if is_ilql_folder(model_id):  # an `alignloop ilql` folder: decode with its Q and V heads
        model = load_decoder(model_id, model)
    model.eval()
    return model, tokenizer


def _sync_pad_id(model: Any, tokenizer: Any) -> None:
    cfg = model.config
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF detail: log-probs of policy and reference must
    not be noised, and PPO's ratio must be 1 on the first minibatch)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        # attention dropout applied as a float (``dropout=self.dropout if self.training``: T5, Llama, ...)
        for name in _DROPOUT_FLOATS:
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


_DROPOUT_FLOATS = ("dropout", "attention_dropout", "attn_dropout", "dropout_p", "dropout_rate")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing: each layer's activations are recomputed in the backward pass
    instead of kept from the forward. Peak memory falls by most of the activations (for the whole
    batch at once, the largest part of a LoRA run's peak), an update costs about one more forward.
    The gradients are the same. Transformers applies it only while the model is in training mode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(
            f"{type(base).__name__} does not support gradient checkpointing",
            fix="set gradient_checkpointing=false (or use smaller micro-batches: grad_accum)",
        )
    kwargs = {"use_reentrant": False}  # no need for inputs that require grad (LoRA's frozen embeddings)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------


class LoraSettings(Config):
    """LoRA adapter settings (peft). ``target_modules=None`` picks them per architecture."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str | None = None


def lora_target_modules(model: nn.Module) -> list[str] | str:
    """The default LoRA targets of ``model``'s architecture that exist in it, else ``"all-linear"``."""
    model_type = getattr(model.config, "model_type", "")
    wanted = LORA_TARGETS.get(model_type)
    if not wanted:
        return "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    present = [t for t in wanted if t in names]
    return present or "all-linear"


def sorted_adapter_config(peft_model: Any) -> Any:
    """Sort the set-valued fields of ``peft_model``'s adapter configs (``target_modules``), in place.

    peft keeps them as Python sets and writes ``list(set)`` to ``adapter_config.json``: the
    order of a set of strings changes with every process's hash seed, and so would the file.
    """
    for cfg in getattr(peft_model, "peft_config", {}).values():
        for key, value in vars(cfg).items():
            if isinstance(value, set):
                setattr(cfg, key, sorted(value))
    return peft_model


def add_lora(model: nn.Module, settings: LoraSettings | None = None) -> Any:
    """Wrap ``model`` with a fresh, trainable LoRA adapter named ``"default"``."""
    from peft import LoraConfig, TaskType, get_peft_model

    settings = settings or LoraSettings()
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    targets = settings.target_modules or lora_target_modules(model)
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",  # GPT-2 uses Conv1D
    )
    try:
        return sorted_adapter_config(get_peft_model(model, cfg))
    except ValueError as e:
        raise UserError(
            f"LoRA target modules {targets!r} do not fit this model ({str(e).splitlines()[0]})",
            fix="set lora.target_modules to names of its linear layers",
        ) from None


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Token tensors for (prompt, response) pairs; see the module docstring for the layout.

    ``input_ids``/``attention_mask``: causal (B, P+R) full sequences; seq2seq (B, S) encoder input.
    ``position_ids``: causal only. ``decoder_input_ids``/``decoder_attention_mask``: seq2seq (B, R).
    ``response_ids``/``response_mask``: (B, R). ``prompt_width``: P (causal), 0 for seq2seq.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    prompt_width: int = 0
    position_ids: Tensor | None = None
    decoder_input_ids: Tensor | None = None
    decoder_attention_mask: Tensor | None = None

    @property
    def is_seq2seq(self) -> bool:
        return self.decoder_input_ids is not None

    def to(self, device: str | torch.device) -> Batch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()})

    def select(self, index: Tensor | slice | Sequence[int]) -> Batch:
        """Rows ``index`` of every tensor (a minibatch)."""
        if not isinstance(index, (Tensor, slice)):
            index = torch.as_tensor(index, dtype=torch.long)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v[index] if isinstance(v, Tensor) else v for k, v in kw.items()})

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    seq2seq: bool = False,
    decoder_start_id: int | None = None,
) -> Batch:
    """Pad token-id lists into a :class:`Batch`. Masks come from lengths, never from ``pad_id``
    (GPT-2's pad token is often its EOS token, which is also a real response token)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    B = len(prompt_ids)
    R = max(1, max((len(r) for r in response_ids), default=1))
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    rmask = torch.zeros((B, R), dtype=torch.long)
    for i, r in enumerate(response_ids):
        resp[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        rmask[i, : len(r)] = 1
    if seq2seq:
        if decoder_start_id is None:
            raise ValueError("seq2seq batches need decoder_start_id")
        S = max(1, max(len(p) for p in prompt_ids))
        enc = torch.full((B, S), pad_id, dtype=torch.long)
        emask = torch.zeros((B, S), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            enc[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
            emask[i, : len(p)] = 1
        dec = torch.cat([torch.full((B, 1), decoder_start_id, dtype=torch.long), resp[:, :-1]], dim=1)
        dmask = torch.cat([torch.ones((B, 1), dtype=torch.long), rmask[:, :-1]], dim=1)
        return Batch(enc, emask, resp, rmask, 0, None, dec, dmask)
    P = max(1, max(len(p) for p in prompt_ids))
    prompt = torch.full((B, P), pad_id, dtype=torch.long)
    pmask = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens (a causal model needs at least one)")
        prompt[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        pmask[i, P - len(p) :] = 1
    input_ids = torch.cat([prompt, resp], dim=1)
    attention_mask = torch.cat([pmask, rmask], dim=1)
    return Batch(input_ids, attention_mask, resp, rmask, P, position_ids_from_mask(attention_mask))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token: ``cumsum(mask) - 1``, 0 on left padding
    (B, T) -> (B, T), so a left-padded row gets the positions it would have alone."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    seq2seq: bool,
    add_eos: bool = True,
    chat: Sequence[bool] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of prompts (with the model's special tokens) and of their responses (+ EOS), read
    the way TRL's DPOTrainer reads them.

    Causal: the response's ids are the ids of ``full_text(prompt, response)`` after the prompt's own
    ids, so a response's leading space is tokenized as in running text (``" not"`` -> ``Ġnot``) and
    no separator is inserted. Where the joint ids do not start with the prompt's (a tokenizer that
    merges across the junction: a prompt ending in a space), the response is tokenized alone.
    Seq2seq: the prompt is the encoder input; the response, without its leading whitespace (the
    decoder starts a new text), the decoder target.

    ``chat[i]``: row i was rendered by a chat template (:func:`alignloop.chat.as_text`). Such a row
    gets no added EOS (the template's end-of-turn ends the response): TRL's reading of
    conversational data. Seq2seq rows all end with EOS (the decoder stops on it), once: a response
    whose ids already end with it (a template whose end-of-turn is the EOS, as the world's) gets no second.
    """
    from alignloop.records import full_text

    if chat is not None and any(chat) and not seq2seq:  # rows rendered by a chat template: apart
        p: list[list[int]] = [[] for _ in prompts]
        r: list[list[int]] = [[] for _ in prompts]
        for flag in (False, True):
            rows = [i for i, c in enumerate(chat) if bool(c) == flag]
            if rows:
                pi, ri = encode_pairs(
                    tokenizer, [prompts[i] for i in rows], [responses[i] for i in rows], seq2seq,
                    add_eos=add_eos and not flag,
                )  # fmt: skip
                for k, i in enumerate(rows):
                    p[i], r[i] = pi[k], ri[k]
        return p, r
    p = [list(x) for x in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    if seq2seq:
        r = [
            list(x) for x in tokenizer([x.lstrip() for x in responses], add_special_tokens=False)["input_ids"]
        ]
    else:
        texts = [full_text(a, b) for a, b in zip(prompts, responses, strict=True)]
        joint = tokenizer(texts, add_special_tokens=True)["input_ids"]
        r = [list(j[len(pi) :]) if list(j[: len(pi)]) == pi else None for pi, j in zip(p, joint, strict=True)]
        alone = [i for i, x in enumerate(r) if x is None]
        if alone:
            apart = tokenizer([responses[i] for i in alone], add_special_tokens=False)["input_ids"]
            for i, ids in zip(alone, apart, strict=True):
                r[i] = list(ids)
    if add_eos and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
        r = [x if seq2seq and x[-1:] == [eos] else x + [eos] for x in r]
    return p, r


# ----------------------------------------------------------------------------------------------
# One forward: log-probs, values, entropy
# ----------------------------------------------------------------------------------------------


@dataclass
class PolicyOutput:
    """Per-response-token outputs, all (B, R); padding positions hold junk, use ``response_mask``."""

    logprobs: Tensor
    entropy: Tensor | None  # None when not asked for (``forward_batch(..., entropy=False)``)
    values: Tensor | None = None


CHUNK_BYTES = 8 * 2**20  # float32 working memory per chunk of the vocabulary-wide maths below


def _row_chunks(logits: Tensor) -> Iterator[slice]:
    """Slices of dim 0 of ``logits`` (B, R, V) whose float32 copy stays within :data:`CHUNK_BYTES`."""
    rows = max(1, CHUNK_BYTES // max(1, 4 * logits[0].numel()))
    return (slice(s, s + rows) for s in range(0, logits.shape[0], rows))


def _chunk_entropy(z: Tensor, lse: Tensor) -> Tensor:
    """``H = lse - sum_v softmax(z)_v z_v`` for float32 rows ``z`` (rows, R, V) and their ``lse`` (rows, R)."""
    return lse - (torch.sub(z, lse.unsqueeze(-1)).exp_() * z).sum(dim=-1)


class _ChosenLogprobs(torch.autograd.Function):
    """Chosen-token log-probs with a chunked forward and backward (see :func:`logprobs_from_logits`)."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, tokens: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Tensor]:
        B, R, _ = logits.shape
        out = torch.empty(B, R, dtype=torch.float32, device=logits.device)
        lse = torch.empty(B, R, dtype=torch.float32, device=logits.device)
        ent = torch.empty((B, R) if entropy else (0,), dtype=torch.float32, device=logits.device)
        for c in _row_chunks(logits):
            z = logits[c].float()
            if temperature != 1.0:
                z = z / temperature
            torch.logsumexp(z, dim=-1, out=lse[c])
            torch.sub(z.gather(-1, tokens[c].unsqueeze(-1)).squeeze(-1), lse[c], out=out[c])
            if entropy:  # reusing this chunk's z and lse (no graph)
                ent[c] = _chunk_entropy(z, lse[c])
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None, None, None]:
        # d out[b,t] / d logits[b,t,v] = (onehot(tokens[b,t])_v - softmax(logits[b,t] / T)_v) / T
        logits, tokens, lse = ctx.saved_tensors
        T = ctx.temperature
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        in_place = logits.dtype == torch.float32  # write softmax straight into the gradient's rows
        for c in _row_chunks(logits):
            z = logits[c].float()
            if T != 1.0:
                z = z / T
            g = grad[c].float().unsqueeze(-1)
            p = torch.sub(z, lse[c].unsqueeze(-1), out=grad_logits[c] if in_place else None).exp_()
            p.mul_(-g).scatter_add_(-1, tokens[c].unsqueeze(-1), g)
            if T != 1.0:
                p.div_(T)
            if not in_place:
                grad_logits[c] = p
        return grad_logits, None, None, None


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[token]`` per position, never a float32 (B, R, V) intermediate.

    Args:
        logits: (B, R, V), any float dtype. tokens: (B, R) long. temperature: > 0.
    Returns:
        (B, R) float32: ``z[b, t, tokens[b, t]] - logsumexp_v z[b, t, v]`` with ``z = logits / temperature``.

    The naive form (``log_softmax(logits.float() / T).gather(...)``) allocates the whole (B, R, V) in
    float32 several times over (the cast, the division, log_softmax, and softmax again in the backward):
    at GPT-2's vocabulary that is 200 KB a response token each. Here the forward keeps only ``logsumexp``
    (B, R), the rows are processed in chunks of :data:`CHUNK_BYTES`, and the backward writes
    ``(onehot - softmax) * grad / T`` chunk by chunk straight into the logits' gradient (the one
    (B, R, V) tensor the backward must produce anyway).
    """
    return _ChosenLogprobs.apply(logits, tokens, float(temperature), False)[0]


def logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`logprobs_from_logits` and, without a graph, :func:`entropy_from_logits` in one chunked pass.

    Args:
        logits: (B, R, V). tokens: (B, R) long. temperature: > 0.
    Returns:
        ``(logprobs, entropy)``, both (B, R) float32; the log-probs carry the gradient, the entropy none
        (for logging). Each chunk's ``logsumexp`` serves both, so the entropy costs one ``exp`` pass over
        the logits instead of a second ``logsumexp`` and ``exp``; both equal the separate functions'
        results bit for bit.
    """
    return _ChosenLogprobs.apply(logits, tokens, float(temperature), True)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the categorical distribution ``softmax(logits / temperature)`` at each position.

    Args:
        logits: (B, R, V).
    Returns:
        (B, R) float32: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, ``z = logits / temperature``.

    Without autograd (entropy logged, not trained) it runs in row chunks of :data:`CHUNK_BYTES`, so no
    float32 (B, R, V) intermediate is made; with autograd it is one differentiable expression.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        z = logits.float() / temperature if temperature != 1.0 else logits.float()
        p = torch.softmax(z, dim=-1)
        return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for c in _row_chunks(logits):
        z = logits[c].float()
        if temperature != 1.0:
            z = z / temperature
        out[c] = _chunk_entropy(z, torch.logsumexp(z, dim=-1))
    return out


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")  # torch >= 2.4 has a fused AdamW kernel for these


def make_optimizer(
    params: Sequence[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW for every trainer: the fused kernel where torch has one for these tensors, else ``foreach``.

    torch's default AdamW on a CPU is a Python loop over the parameters (16.6% of a tiny PPO step
    here); ``fused=True`` (CPU and CUDA in torch >= 2.4) updates every tensor in one kernel call, and
    ``foreach=True`` (multi-tensor ops) is the fallback (e.g. MPS or an old torch). Same update rule.
    """
    params = list(params)
    # torch checks this only at the first step(): floating-point tensors on a device with the kernel
    fused = all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    kind = {"fused": True} if fused else {"foreach": True}
    # FSDP2 shards (DTensors) next to whole tensors (PPO's value head): one kernel call cannot mix them,
    # so each kind gets its own parameter group (same settings)
    sharded = [p for p in params if hasattr(p, "full_tensor")]
    whole = [p for p in params if not hasattr(p, "full_tensor")]
    groups: Any = [{"params": g} for g in (sharded, whole) if g] if sharded and whole else params
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kind)


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    import inspect

    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (lm_head on the last columns only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in _forward_params(type(base))


def _trunk_forward(model: nn.Module, batch: Batch, need_hidden: bool) -> tuple[Tensor, Tensor | None]:
    """Logits (B, R, V) that predict the response tokens and the last hidden state (B, R, H)."""
    R = batch.response_ids.shape[1]
    if batch.is_seq2seq:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=batch.decoder_input_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
            output_hidden_states=need_hidden,
            use_cache=False,
        )
        hidden = out.decoder_hidden_states[-1] if need_hidden else None
        return out.logits, hidden
    P = batch.prompt_width
    kw: dict[str, Any] = {}
    kept = False
    if _supports_logits_to_keep(model):
        # lm_head only on the R columns that predict the response (saves a (B, P, V) matmul), and logits
        # that are exactly those columns: no slice whose backward zero-fills and copies a (B, R+1, V) grad
        kw["logits_to_keep"] = torch.arange(P - 1, P - 1 + R, device=batch.input_ids.device)
        kept = True
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=need_hidden,
        use_cache=False,
        **kw,
    )
    logits = out.logits if kept else out.logits[:, P - 1 : P - 1 + R]
    hidden = out.hidden_states[-1][:, P - 1 : P - 1 + R] if need_hidden else None
    return logits, hidden


def logits_and_hidden(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(B, R, V) logits predicting each response token and (B, R, H) the last hidden state at the
    same column (the state *before* that token), in one forward."""
    logits, hidden = _trunk_forward(model, batch, need_hidden=True)
    assert hidden is not None
    return logits, hidden


def forward_batch(
    model: nn.Module,
    batch: Batch,
    value_head: nn.Module | None = None,
    temperature: float = 1.0,
    entropy_grad: bool = True,
    entropy: bool = True,
) -> PolicyOutput:
    """Per-response-token log-probs, entropy and (with ``value_head``) values, in ONE forward.

    ``temperature`` divides the logits first (use the sampling temperature so the log-probs
    are those of the distribution the responses were drawn from). ``entropy_grad=False`` gives the
    entropy without a graph (for logging when no loss term uses it): its softmax over the whole
    vocabulary is then not kept for the backward pass (for GPT-2, 200 KB a response token), and it
    comes from the log-probs' own chunked pass (:func:`logprobs_and_entropy`). ``entropy=False``
    skips it (``PolicyOutput.entropy`` is then None): the rollout's no-grad pass has no use for it.
    """
    logits, hidden = _trunk_forward(model, batch, need_hidden=value_head is not None)
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    if not entropy:
        return PolicyOutput(logprobs_from_logits(logits, batch.response_ids, temperature), None, values)
    if entropy_grad and torch.is_grad_enabled() and logits.requires_grad:  # a loss term uses it
        ent = entropy_from_logits(logits, temperature)
        return PolicyOutput(logprobs_from_logits(logits, batch.response_ids, temperature), ent, values)
    logprobs, ent = logprobs_and_entropy(logits, batch.response_ids, temperature)
    return PolicyOutput(logprobs, ent, values)


def token_logprobs(model: nn.Module, batch: Batch, temperature: float = 1.0) -> Tensor:
    """(B, R) log-probs of each response token (zero at padding)."""
    logits, _ = _trunk_forward(model, batch, need_hidden=False)
    return logprobs_from_logits(logits, batch.response_ids, temperature) * batch.response_mask


def sequence_logprobs(model: nn.Module, batch: Batch, temperature: float = 1.0) -> Tensor:
    """(B,) ``log pi(response | prompt) = sum_t log pi(r_t | prompt, r_<t)`` over real tokens."""
    return token_logprobs(model, batch, temperature).sum(dim=-1)


# ----------------------------------------------------------------------------------------------
# The policy: model (+LoRA) + value head or critic + reference
# ----------------------------------------------------------------------------------------------


def new_value_head(hidden_size: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """``nn.Linear(hidden, 1)`` with zero weight and bias: every value starts at exactly 0."""
    head = nn.Linear(hidden_size, 1, dtype=dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("hidden_size", "d_model", "n_embd"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise UserError(f"cannot find the hidden size of {type(model).__name__}")


@dataclass
class Critic:
    """A separate value network: its own trunk (``AutoModel``) and a linear head."""

    trunk: nn.Module
    head: nn.Linear

    def values(self, batch: Batch) -> Tensor:
        """(B, R) values read at the columns that predict each response token."""
        R = batch.response_ids.shape[1]
        if batch.is_seq2seq:
            out = self.trunk(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                decoder_input_ids=batch.decoder_input_ids,
                decoder_attention_mask=batch.decoder_attention_mask,
                use_cache=False,
            )
            hidden = out.last_hidden_state
        else:
            out = self.trunk(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            P = batch.prompt_width
            hidden = out.last_hidden_state[:, P - 1 : P - 1 + R]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.trunk.parameters()
        yield from self.head.parameters()


def load_critic(model_id: str | Path, dtype: torch.dtype, device: torch.device, vocab_size: int) -> Critic:
    """A critic from any HF folder (e.g. the reward model): its trunk, and its score head when that is a
    single ``Linear(hidden, 1)`` (a reward model's), else a zero-initialised head."""
    from transformers import AutoModel

    model_id = resolve_model_id(model_id)
    try:
        trunk = AutoModel.from_pretrained(model_id, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load critic {model_id!r} ({str(e).splitlines()[0]})") from None
    fuse_activations(trunk)
    if getattr(trunk.config, "model_type", "") in BIDIRECTIONAL:
        raise UserError(
            f"critic {model_id!r} is a bidirectional encoder ({trunk.config.model_type}): its value at a token "
            "would see the tokens after it",
            fix="use a causal model (e.g. a reward model built on the policy's architecture) or the value head",
        )
    if getattr(trunk.config, "vocab_size", vocab_size) != vocab_size:
        raise UserError(
            f"critic {model_id!r} has vocabulary size {trunk.config.vocab_size}, the policy {vocab_size}",
            fix="the critic must share the policy's tokenizer",
        )
    head = new_value_head(hidden_size(trunk), dtype).to(device)
    from safetensors import safe_open

    weights = Path(model_id) / "model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            for name in ("score.weight", "v_head.weight", "value_head.weight"):
                if name in names and tuple(f.get_slice(name).get_shape()) == (1, head.in_features):
                    with torch.no_grad():
                        head.weight.copy_(f.get_tensor(name))
                        bias = name.replace(".weight", ".bias")
                        if bias in names:
                            head.bias.copy_(f.get_tensor(bias))
                    break
    disable_dropout(trunk)
    return Critic(trunk, head)


@dataclass
class Policy:
    """A trainable policy with its reference and its value estimate.

    ``model``: a PeftModel (LoRA) or a plain HF model. ``value_head``: ``Linear(hidden, 1)`` on
    the policy's last hidden state (shares the trunk) or None. ``critic``: a separate value
    network or None. ``reference``: a frozen full copy (no LoRA) or None (LoRA: the same model
    with the adapter disabled, or with the frozen ``"reference"`` adapter when the policy
    started from a trained adapter).
    """

    model: Any
    tokenizer: Any
    is_seq2seq: bool
    value_head: nn.Linear | None = None
    critic: Critic | None = None
    reference: Any = None
    reference_adapter: str | None = None
    model_id: str = ""

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def decoder_start_id(self) -> int | None:
        cfg = self.model.config
        start = getattr(cfg, "decoder_start_token_id", None)
        return int(start) if start is not None else (self.pad_id if self.is_seq2seq else None)

    def batch(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> Batch:
        """:func:`build_batch` with this policy's pad/start tokens, on its device."""
        b = build_batch(prompt_ids, response_ids, self.pad_id, self.is_seq2seq, self.decoder_start_id)
        return b.to(self.device)

    def forward(self, batch: Batch, temperature: float = 1.0, entropy: bool = True) -> PolicyOutput:
        """Log-probs, entropy (unless ``entropy=False``) and values (B, R) of the response tokens; one
        trunk forward with a value head, plus one critic forward with a separate critic."""
        out = forward_batch(self.model, batch, self.value_head, temperature, entropy=entropy)
        if self.critic is not None:
            out.values = self.critic.values(batch)
        return out

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch, temperature: float = 1.0) -> Tensor:
        """(B, R) log-probs of the response tokens under the frozen reference policy."""
        if self.reference is not None:
            return token_logprobs(self.reference, batch, temperature)
        with self.reference_mode():
            return token_logprobs(self.model, batch, temperature)

    @contextmanager
    def reference_mode(self) -> Iterator[Any]:
        """Inside, ``self.model`` computes the reference policy (LoRA only)."""
        if not self.is_lora:
            raise RuntimeError("reference_mode needs a LoRA policy; use policy.reference")
        if self.reference_adapter is None:
            with self.model.disable_adapter():
                yield self.model
            return
        active = self.model.active_adapter
        self.model.set_adapter(self.reference_adapter, inference_mode=True)
        try:
            yield self.model
        finally:
            self.model.set_adapter(active)  # makes the trained adapter trainable again

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimiser updates: LoRA weights (or all weights), the value head, the critic."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        return params

    def save(self, out: str | Path, state_dict: dict[str, Any] | None = None) -> Path:
        """An HF folder: weights (adapter only with LoRA), tokenizer, value head, critic.

        ``state_dict``: the model's whole weights when the model itself holds only a shard (FSDP2,
        ``distributed.full_state_dict``)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        extra = {} if state_dict is None else {"state_dict": state_dict}
        if self.is_lora:  # not the frozen reference copy
            self.model.save_pretrained(out, selected_adapters=["default"], **extra)
        else:
            self.model.save_pretrained(out, **extra)
        self.tokenizer.save_pretrained(out)
        if self.value_head is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                str(out / VALUE_HEAD_FILE),
            )
        if self.critic is not None:
            self.critic.trunk.save_pretrained(out / "critic")
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.critic.head.state_dict().items()},
                str(out / "critic" / VALUE_HEAD_FILE),
            )
        info = {"model_id": self.model_id, "is_seq2seq": self.is_seq2seq, "lora": self.is_lora}
        (out / POLICY_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return out


def _load_value_head(path: Path, head: nn.Linear) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    head.load_state_dict({k: v.to(head.weight.dtype) for k, v in state.items()})


def load_policy(
    model_id: str | Path,
    lora: LoraSettings | None = None,
    value_head: bool = True,
    critic: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    reference: bool = True,
    no_dropout: bool = True,
    reference_base: bool = False,
) -> Policy:
    """Load a trainable policy with its frozen reference and (optionally) its value estimate.

    - ``lora`` set: a fresh LoRA adapter; the reference is the same model with the adapter
      disabled (one copy of the base weights).
    - ``model_id`` is a trained adapter folder: that adapter is trained further (``lora`` is
      ignored) and a frozen copy of it, adapter ``"reference"``, is the reference; with
      ``reference_base`` the reference is the base model under it (the adapter disabled).
    - otherwise full fine-tuning; the reference is a frozen deep copy.
    ``value_head``: a zero-initialised ``Linear(hidden, 1)`` on the shared trunk (loaded from
    ``value_head.safetensors`` when the folder has one). ``critic``: a separate value model
    folder instead (e.g. the reward model). ``no_dropout``: every dropout p set to 0.
    """
    from peft import PeftModel

    base_name = portable_base(model_id)
    model_id = resolve_model_id(model_id)
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    configure_threads()
    seq2seq = is_seq2seq(model_id)
    tokenizer = load_tokenizer(model_id)
    reference_model = None
    reference_adapter = None
    if is_adapter_folder(model_id):
        base = _from_pretrained(resolve_model_id(_adapter_base(model_id)), seq2seq, dtype, device)
        model = sorted_adapter_config(PeftModel.from_pretrained(base, model_id, is_trainable=True))
        if reference and not reference_base:
            model.load_adapter(model_id, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter("default")
            reference_adapter = REFERENCE_ADAPTER
    else:
        model = _from_pretrained(model_id, seq2seq, dtype, device)
        if lora is not None:
            model = add_lora(model, lora)
        elif reference:
            reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    for adapter in getattr(model, "peft_config", {}).values():
        adapter.base_model_name_or_path = base_name  # what its saved adapter_config.json names
    _sync_pad_id(model, tokenizer)
    if no_dropout:
        disable_dropout(model)
        if reference_model is not None:
            disable_dropout(reference_model)
    head = None
    crit = None
    if critic is not None:
        crit = load_critic(critic, dtype, device, model.config.vocab_size)
    elif value_head:
        head = new_value_head(hidden_size(model), dtype).to(device)
        saved = Path(model_id) / VALUE_HEAD_FILE
        if saved.is_file():
            _load_value_head(saved, head)
    return Policy(model, tokenizer, seq2seq, head, crit, reference_model, reference_adapter, model_id)


def parameter_storage_bytes(*modules: nn.Module | None) -> int:
    """Bytes of distinct parameter/buffer storage across ``modules`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
