"""Each change's share of a PPO update step: one process, variants alternated, medians.

One PPO minibatch update (forward of the policy with ``output_hidden_states`` + value head, chosen-token
log-probs, a clipped policy loss and a value loss, backward, gradient clipping, AdamW) on a random-init
GPT-2 (``--size small``: 12 x 768, vocab 50257, 124M; ``tiny``: 2 x 128, vocab 2048), batch ``--batch``,
``--prompt`` + ``--response`` tokens. The variants add one change at a time:

- ``before``: torch's default AdamW (a Python loop over the parameters on a CPU), log-probs from a
  float32 ``logsumexp`` over the whole vocabulary, the LM head on R+1 columns then sliced;
- ``+fused``: :func:`alignloop.models.make_optimizer` (fused AdamW);
- ``+chunked``: :func:`alignloop.models.logprobs_from_logits` (chunked, no float32 (B, R, V) copies);
- ``+keep``: the LM head on exactly the R response columns (``logits_to_keep`` as positions).

The variants run round-robin for ``--rounds`` rounds in this one process (the first round is warm-up,
dropped); they share one model, with two optimizers over it (default and fused AdamW). Each update is
timed in process CPU seconds (with one torch thread that is the work, whatever else the machine runs).
Medians and each change's share of the ``before`` time are printed.

    python benchmarks/update_profile.py --size small --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from alignloop.models import configure_threads, fuse_activations, logprobs_from_logits, make_optimizer


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The form before issue 30: float32 gather minus a whole-vocabulary logsumexp."""
    logits = logits.float()
    return logits.gather(-1, tokens[..., None])[..., 0] - torch.logsumexp(logits, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    threads = configure_threads()
    torch.manual_seed(0)
    if a.size == "small":
        cfg = GPT2Config(vocab_size=50257, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    else:
        cfg = GPT2Config(vocab_size=2048, n_embd=128, n_layer=2, n_head=2, pad_token_id=0, eos_token_id=1)
    base = GPT2LMHeadModel(cfg).eval()
    fuse_activations(base)
    B, P, R = a.batch, a.prompt, a.response
    ids = torch.randint(4, cfg.vocab_size, (B, P + R))
    tokens = ids[:, P:]
    old_lp = torch.zeros(B, R) - 5.0
    adv, ret = torch.randn(B, R), torch.randn(B, R)

    variants = {"before": (False, False, False), "+fused": (True, False, False),
                "+chunked": (True, True, False), "+keep": (True, True, True)}  # fmt: skip
    # one model for every variant (the work of a step does not depend on the weights' values); two
    # optimizers over the same parameters: torch's default AdamW and make_optimizer's fused one
    head = torch.nn.Linear(cfg.n_embd, 1)
    params = [*base.parameters(), *head.parameters()]
    optimizers = {False: torch.optim.AdamW(params, lr=1e-5), True: make_optimizer(params, 1e-5)}
    state = {name: (base, head, params, optimizers[fused]) for name, (fused, _, _) in variants.items()}

    def update(name: str) -> float:
        m, head, params, opt = state[name]
        _, chunked, keep = variants[name]
        t = time.process_time()
        if keep:
            out = m(ids, output_hidden_states=True, logits_to_keep=torch.arange(P - 1, P - 1 + R))
            logits = out.logits
        else:
            out = m(ids, output_hidden_states=True, logits_to_keep=R + 1)
            logits = out.logits[:, :R]
        lp = logprobs_from_logits(logits, tokens) if chunked else naive_logprobs(logits, tokens)
        v = head(out.hidden_states[-1][:, P - 1 : P - 1 + R].detach())[..., 0]
        ratio = torch.exp(lp - old_lp)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        loss = pg + 0.1 * 0.5 * ((v - ret) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.process_time() - t

    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(a.rounds):
        for n in variants:
            s = update(n)
            if r:
                times[n].append(s)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(
        f"PPO minibatch update, GPT-2 {a.size} ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M), "
        f"batch {B}, {P}+{R} tokens, fp32, {threads} thread(s), medians of {a.rounds - 1} rounds, "
        f"process CPU seconds per update (steady on a shared machine)"
    )
    prev = med["before"]
    for n in variants:
        print(
            f"  {n:10s} {med[n]:7.3f} s   change {100 * (prev - med[n]) / med['before']:+5.1f}% of 'before'"
        )
        prev = med[n]
    print(f"  all changes: {med['+keep'] / med['before']:.2f}x the 'before' time")


if __name__ == "__main__":
    main()
