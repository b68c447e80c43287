"""GPU smoke run: what a person with one or more GPUs runs as is, to fill the GPU rows of docs/distributed.md.

    python benchmarks/gpu_smoke.py                               # transformers + vllm backends, PPO, DPO, FSDP2 if 2+ GPUs
    python benchmarks/gpu_smoke.py --backends transformers       # without vLLM

On a small real architecture at random init (a 4-layer Llama, 512 wide, word-level tokenizer, bf16 as
alignloop picks on a GPU), through alignloop's own commands:

1. ``alignloop generate --backend B`` for each backend asked for: tokens/s;
2. a short PPO (LoRA) and a short DPO (full fine-tuning): seconds a step, tokens/s, peak GPU memory;
3. with two or more GPUs: the same DPO under FSDP2 on 2 GPUs (configs/accelerate/fsdp.yaml), whose
   per-process training-state bytes it prints beside the 1-GPU run's.

It fails loudly -- exit 1 with the reason, never a skip -- when it cannot do what it was asked: no CUDA
GPU, a backend that cannot run here (vLLM not installed, ...), or any command failing. Paste its output
into docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def fail(msg: str) -> None:
    print(f"gpu_smoke: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


PEAK_MB: dict[str, float] = {}


def alignloop(*args: str, launcher: list[str] | None = None) -> str:
    """Run an alignloop command; its stdout, or a loud failure with its stderr. The peak device memory
    used while it runs (GPU 0, sampled every 50 ms, this process's own CUDA context subtracted) is
    kept in PEAK_MB under the command's --out."""
    import threading

    import torch

    cmd = [*(launcher or [sys.executable, "-m"]), "alignloop", *map(str, args)]
    free, total = torch.cuda.mem_get_info(0)
    base, peak, done = total - free, [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            f, t = torch.cuda.mem_get_info(0)
            peak[0] = max(peak[0], (t - f - base) / 2**20)
            time.sleep(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    done.set()
    thread.join()
    if res.returncode != 0:
        fail(f"`{' '.join(cmd)}` exited {res.returncode}:\n{res.stderr[-3000:]}")
    if "--out" in args:
        PEAK_MB[str(args[args.index("--out") + 1])] = peak[0]
    print(
        f"  ({time.time() - t0:.1f} s, peak GPU 0 memory {peak[0]:.0f} MB) {' '.join(map(str, args[:2]))}",
        flush=True,
    )
    return res.stdout


def build_model(folder: Path) -> None:
    """A 4-layer Llama, 512 wide, random init, with a 4096-word tokenizer (benchmarks/common.py)."""
    import torch
    from common import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(4096)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="transformers,vllm", help="generation backends to run (comma list)")
    ap.add_argument("--steps", type=int, default=10, help="PPO and DPO steps")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        fail("no CUDA GPU here: this script measures GPUs (the CPU paths are tested by the test suite)")
    gpus = torch.cuda.device_count()
    print(f"GPUs: {gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    work = Path(tempfile.mkdtemp(prefix="alignloop-gpu-smoke-"))
    model = work / "llama"
    build_model(model)
    words = [f"w{i}" for i in range(4, 200)]
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": str(i), "prompt": " ".join(words[i : i + 8])}) + "\n" for i in range(64))
    )
    pairs = work / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {"prompt": " ".join(words[i : i + 8]), "chosen": " w10 w11 w12", "rejected": " w90 w91 w92"}
            )
            + "\n"
            for i in range(128)
        )
    )
    rows = []

    print("1. generation backends", flush=True)
    for backend in backends:
        out = alignloop("generate", "--model", model, "--prompts", prompts, "--out", work / f"gen-{backend}.jsonl",
                        "--k", "4", "--max-new-tokens", "64", "--ignore-eos", "--backend", backend)  # fmt: skip
        stats = dict(kv.split("=", 1) for kv in out.split())
        peak = PEAK_MB[str(work / f"gen-{backend}.jsonl")]
        rows.append(
            (f"generate ({backend})", f"{float(stats['tokens_per_second']):.0f} tokens/s", f"{peak:.0f} MB")
        )

    print("2. PPO (LoRA) and DPO (full), one GPU", flush=True)
    ppo = work / "ppo"
    alignloop("ppo", "--policy", model, "--reward", "world:gold", "--prompts", prompts, "--out", ppo, "--lora",
              "--report-to", "none", "--set", f"steps={args.steps}", "--set", "batch_size=32",
              "--set", "minibatch_size=8", "--set", "sampling.max_new_tokens=32")  # fmt: skip
    rows.append(("PPO step", *_step_line(ppo)))
    dpo1 = work / "dpo-1gpu"
    dpo_args = [
        "--pairs",
        pairs,
        "--report-to",
        "none",
        "--set",
        f"max_steps={args.steps}",
        "--set",
        "batch_size=16",
    ]
    alignloop("dpo", "--policy", model, "--out", dpo1, *dpo_args)
    rows.append(("DPO step (1 GPU)", *_step_line(dpo1)))

    if gpus >= 2:
        print("3. DPO under FSDP2 on 2 GPUs", flush=True)
        dpo2 = work / "dpo-fsdp2"
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "-m"]  # fmt: skip
        alignloop("dpo", "--policy", model, "--out", dpo2, *dpo_args, launcher=launcher)
        m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (dpo1, dpo2))
        ratio = m2["model_state_bytes"] / m1["model_state_bytes"]
        rows.append(("DPO step (FSDP2, 2 GPUs)", *_step_line(dpo2)))
        rows.append(("FSDP2 / 1-GPU training state per process", f"{ratio:.3f}x", ""))
    else:
        print("3. FSDP2: one GPU only, not run (it needs 2)", flush=True)

    print(f"\n{'what':<44}{'measured':>22}  peak GPU memory", flush=True)
    for what, value, mem in rows:
        print(f"{what:<44}{value:>22}  {mem}")


def _step_line(folder: Path) -> tuple[str, str]:
    """Median seconds a step from metrics.jsonl; the stage's peak memory if it logged one."""
    import statistics

    log = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [r["time"] for r in log]
    steps = [b - a for a, b in zip(times, times[1:], strict=False)] or [float("nan")]
    metrics = json.loads((folder / "metrics.json").read_text())
    tps = metrics.get("tokens_per_second") or (log[-1].get("tokens_per_second") if log else None)
    value = f"{statistics.median(steps):.3f} s/step" + (f", {tps:.0f} tok/s" if tps else "")
    mem = f"{PEAK_MB.get(str(folder), float('nan')):.0f} MB on GPU 0"
    if "model_state_bytes" in metrics:
        mem += f" (training state {metrics['model_state_bytes'] / 1e9:.3f} GB a process)"
    return value, mem


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
