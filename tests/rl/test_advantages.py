"""The critic-free advantages and losses, against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.rl.advantages import (
    batch_normalised_returns,
    discounted_returns,
    flat_groups,
    group_normalised,
    leave_one_out,
    token_rewards,
)
from alignloop.rl.losses import aggregate, k3_loss

# two prompts, G = 4: the first group spread out, the second all equal (no signal)
SCORES = torch.tensor([1.0, 3.0, 5.0, 7.0, 2.0, 2.0, 2.0, 2.0])


def test_group_normalised_by_hand():
    # group 1: mean 4, deviations [-3, -1, 1, 3], unbiased std sqrt((9 + 1 + 1 + 9) / 3) = sqrt(20 / 3)
    want = [d / (math.sqrt(20 / 3) + 1e-4) for d in (-3, -1, 1, 3)] + [0.0] * 4
    assert group_normalised(SCORES, 4).tolist() == pytest.approx(want, abs=1e-6)
    # Dr. GRPO: no std, the deviations themselves
    assert group_normalised(SCORES, 4, scale="none").tolist() == [-3.0, -1.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    # batch std: the 8 rewards have mean 3, squared deviations 4+0+4+16+1+1+1+1 = 28, std sqrt(28 / 7) = 2
    want = [d / (2.0 + 1e-4) for d in (-3, -1, 1, 3)] + [0.0] * 4
    assert group_normalised(SCORES, 4, scale="batch").tolist() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="group, batch or none"):
        group_normalised(SCORES, 4, scale="std")


def test_leave_one_out_by_hand():
    # 1 - (3+5+7)/3 = -4;  3 - (1+5+7)/3 = -4/3;  5 - (1+3+7)/3 = 4/3;  7 - (1+3+5)/3 = 4
    want = [-4.0, -4 / 3, 4 / 3, 4.0, 0.0, 0.0, 0.0, 0.0]
    assert leave_one_out(SCORES, 4).tolist() == pytest.approx(want, abs=1e-6)
    pair = torch.tensor([0.0, 1.0])  # G = 2: each completion's baseline is the other one
    assert leave_one_out(pair, 2).tolist() == [-1.0, 1.0]


def test_equal_rewards_give_exactly_zero_and_no_nan():
    same = torch.full((6,), 0.1)  # 0.1 is not exact in binary: a mean could leave a residue
    scaled = [group_normalised(same, 3, scale=s) for s in ("group", "batch", "none")]
    for adv in (*scaled, leave_one_out(same, 3)):
        assert adv.tolist() == [0.0] * 6
    assert flat_groups(SCORES, 4).tolist() == [False, True]


def test_a_group_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        group_normalised(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out(torch.tensor([1.0, 2.0, 3.0]), 4)


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert discounted_returns(r, m).tolist() == [[6.0, 5.0, 3.0, 0.0]]
    # gamma 0.5: G2 = 3, G1 = 2 + 0.5 * 3 = 3.5, G0 = 1 + 0.5 * 3.5 = 2.75
    assert discounted_returns(r, m, gamma=0.5).tolist() == [[2.75, 3.5, 3.0, 0.0]]
    left = discounted_returns(torch.tensor([[9.0, 1.0, 2.0]]), torch.tensor([[0, 1, 1]]))
    assert left.tolist() == [[0.0, 3.0, 2.0]]  # left padding skipped


def test_reinforce_pp_returns_by_hand():
    # scores 1 and -1, beta 0.5; row 0 has 2 real tokens, row 1 has 3
    scores = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, _ = token_rewards(scores, kl, mask, 0.5)
    # r = [-0.05, -0.1 + 1, pad] and [-0.15, 0, -1]; returns [0.85, 0.9] and [-1.15, -1, -1]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9, 0.0], [-0.15, 0.0, -1.0]]))
    g = [0.85, 0.9, -1.15, -1.0, -1.0]
    mean = sum(g) / 5  # -0.28
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 4)  # over the batch's 5 real tokens, Bessel
    want = [[(0.85 - mean) / std, (0.9 - mean) / std, 0.0], [(x - mean) / std for x in g[2:]]]
    got = batch_normalised_returns(rewards, mask)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    flat = batch_normalised_returns(torch.zeros(2, 3), mask)  # equal returns: zero, never NaN
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-6


def test_aggregate_by_hand():
    x = torch.tensor([[1.0, 1.0, 7.0], [4.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(x, m, "token").item() == pytest.approx(6 / 3)  # every token once
    assert aggregate(x, m, "sequence").item() == pytest.approx((1 + 4) / 2)  # each answer's mean
    assert aggregate(x, m, "constant", max_tokens=3).item() == pytest.approx(6 / (2 * 3))  # Dr. GRPO


def test_k3_loss_term_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    mask = torch.ones(1, 2)
    loss = k3_loss(logp, ref, mask)
    # token 0: rho = pi_ref / pi = 0.5 -> 0.5 - log 0.5 - 1 = 0.19315; token 1: rho = 1 -> 0; mean over 2
    assert loss.item() == pytest.approx((0.5 - math.log(0.5) - 1) / 2, abs=1e-6)
    loss.backward()
    # d k3 / d log pi = 1 - rho: 0.5 at token 0, 0 at token 1; halved by the mean
    torch.testing.assert_close(logp.grad, torch.tensor([[0.25, 0.0]]))
    assert k3_loss(logp, ref, mask, "constant", max_tokens=4).item() == pytest.approx(0.19315 / 4, abs=1e-5)
