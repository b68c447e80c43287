"""DPO / IPO / conservative DPO losses against values computed by hand, and DPO's gradient
against the reward model's pair-wise logistic form."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.offline.dpo import (
    average_logps,
    chosen_nll,
    dpo_loss,
    implicit_rewards,
    ipo_loss,
    preference_logits,
    preference_loss,
    read_labels,
    weighted_mean,
)
from alignloop.records import Pair
from alignloop.reward.data import read_pairs

# Two pairs. Pair 0: h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1.0
#            Pair 1: h = (-3 - -2) - (-1 - -2) = -1 - 1 = -2.0
PC = torch.tensor([-1.0, -3.0])
PR = torch.tensor([-2.0, -1.0])
RC = torch.tensor([-1.5, -2.0])
RR = torch.tensor([-1.5, -2.0])


def test_logits_by_hand():
    assert preference_logits(PC, PR, RC, RR).tolist() == pytest.approx([1.0, -2.0])


def test_dpo_loss_by_hand():
    h = torch.tensor([1.0, -2.0])
    # -log sigmoid(0.1 * 1) = log(1 + e^-0.1) = log(1.904837) = 0.644397
    # -log sigmoid(0.1 * -2) = log(1 + e^0.2) = log(2.221403) = 0.798139
    assert dpo_loss(h, beta=0.1).tolist() == pytest.approx([0.644397, 0.798139], abs=1e-6)
    assert dpo_loss(h, beta=0.1).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.2))], abs=1e-6
    )


def test_conservative_dpo_by_hand():
    h = torch.tensor([1.0, -2.0])
    # eps = 0.1: 0.9 * log(1 + e^-0.1) + 0.1 * log(1 + e^0.1) = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    #            0.9 * log(1 + e^0.2) + 0.1 * log(1 + e^-0.2) = 0.9 * 0.798139 + 0.1 * 0.598139 = 0.778139
    got = dpo_loss(h, beta=0.1, label_smoothing=0.1).tolist()
    assert got == pytest.approx([0.654397, 0.778139], abs=1e-6)
    # eps = 0.5: the mean of the two directions
    half = dpo_loss(h, beta=0.1, label_smoothing=0.5).tolist()
    assert half == pytest.approx([0.5 * (0.644397 + 0.744397), 0.5 * (0.798139 + 0.598139)], abs=1e-6)


def test_ipo_loss_by_hand():
    h = torch.tensor([1.0, -2.0])
    # target 1 / (2 * 0.1) = 5: (1 - 5)^2 = 16, (-2 - 5)^2 = 49
    assert ipo_loss(h, beta=0.1).tolist() == pytest.approx([16.0, 49.0])
    # target 1 / (2 * 0.5) = 1: (1 - 1)^2 = 0, (-2 - 1)^2 = 9
    assert ipo_loss(h, beta=0.5).tolist() == pytest.approx([0.0, 9.0])


def test_weights_honoured_by_hand():
    losses = torch.tensor([0.644397, 0.798139])
    # (1 * 0.644397 + 3 * 0.798139) / 4 = 0.759703
    assert weighted_mean(losses, torch.tensor([1.0, 3.0])).item() == pytest.approx(0.759703, abs=1e-6)
    assert weighted_mean(losses).item() == pytest.approx((0.644397 + 0.798139) / 2, abs=1e-6)
    # a zero weight removes the pair
    assert weighted_mean(losses, torch.tensor([0.0, 2.0])).item() == pytest.approx(0.798139, abs=1e-6)
    # data parallel: a rank's share of the global weight
    assert weighted_mean(losses, torch.tensor([1.0, 3.0]), total_weight=8.0).item() == pytest.approx(
        3.038814 / 8, abs=1e-6
    )


def test_pair_weight_is_read_as_the_reward_model_reads_it(tmp_path):
    """weight = P(chosen is better): hard labels drop ties and swap below 0.5 (as reward training's
    read_pairs); soft labels keep each weight p as the label of -p log s(bh) - (1-p) log s(-bh)."""
    rows = [
        Pair(prompt="q", chosen="a", rejected="b", weight=1.0),
        Pair(prompt="q", chosen="a", rejected="c", weight=0.667),
        Pair(prompt="q", chosen="b", rejected="c", weight=0.5, tie=True),
        Pair(prompt="q", chosen="c", rejected="d", weight=0.25),
    ]
    hard, ties = read_labels(rows, "hard")
    assert ties == 1
    assert [(p.chosen, p.rejected, p.weight) for p in hard] == [
        ("a", "b", 1.0),
        ("a", "c", 1.0),
        ("d", "c", 1.0),
    ]
    soft, ties = read_labels(rows, "soft")
    assert ties == 0 and [p.weight for p in soft] == [1.0, 0.667, 0.5, 0.25]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in rows))
    groups = read_pairs(path, hard_labels=True).groups
    assert sum(len(g.pairs) for g in groups) == 3  # reward training keeps the same three
    h = torch.tensor([2.0, -1.0])
    p = torch.tensor([0.75, 0.5])
    z = 0.5 * h
    expected = -p * torch.nn.functional.logsigmoid(z) - (1 - p) * torch.nn.functional.logsigmoid(-z)
    assert torch.allclose(dpo_loss(h, 0.5, 1 - p), expected)


def test_preference_loss_stats_by_hand():
    loss, s = preference_loss(PC, PR, RC, RR, beta=0.1, weights=torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx(0.759703, abs=1e-6)
    # implicit rewards 0.1 * (pi - ref): chosen [0.05, -0.1], rejected [-0.05, 0.1]
    assert s["rewards_chosen"].tolist() == pytest.approx([0.05, -0.1])
    assert s["rewards_rejected"].tolist() == pytest.approx([-0.05, 0.1])
    assert s["margin"].tolist() == pytest.approx([0.1, -0.2])
    assert s["correct"].tolist() == [1.0, 0.0]
    ipo, _ = preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((16 + 49) / 2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")


def test_implicit_reward_and_average():
    assert implicit_rewards(torch.tensor([-2.0]), torch.tensor([-3.0]), 0.5).tolist() == [0.5]
    tok = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert average_logps(tok, mask).tolist() == pytest.approx([-1.5, -4.0])


def test_chosen_nll_by_hand():
    # log pi(y_w) = -3 over 2 tokens, -4 over 4 tokens: mean token NLL 1.5 and 1.0
    nll = chosen_nll(torch.tensor([-3.0, -4.0]), torch.tensor([2, 4]))
    assert nll.tolist() == pytest.approx([1.5, 1.0])
    assert weighted_mean(nll, torch.tensor([1.0, 3.0])).item() == pytest.approx((1.5 + 3.0) / 4)


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradient_is_pairwise_logistic(beta, eps):
    """dL/dlog pi equals the reward model's logistic-loss gradient with r = beta * log(pi / ref):
    d/d log pi(y_w) [-log sigmoid(r_w - r_l)] = -beta * sigmoid(-(r_w - r_l)), and stays finite
    (no 0 * inf) when beta * h is far beyond fp32's sigmoid range."""
    pc = torch.tensor([-1.0, -3.0, -10.0, -0.5], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0, -1.0, -0.7], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0, -2.0, -0.6])
    rr = torch.tensor([-1.5, -2.0, -2.0, -0.6])
    loss = dpo_loss(preference_logits(pc, pr, rc, rr), beta, eps).sum()
    loss.backward()

    # the same gradient from the pair-wise logistic (Bradley-Terry) loss on implicit rewards
    pc2, pr2 = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    r_w, r_l = beta * (pc2 - rc), beta * (pr2 - rr)
    bt = (
        -(1 - eps) * torch.nn.functional.logsigmoid(r_w - r_l)
        - eps * torch.nn.functional.logsigmoid(r_l - r_w)
    ).sum()
    bt.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    torch.testing.assert_close(pc.grad, pc2.grad)
    torch.testing.assert_close(pr.grad, pr2.grad)

    # and in closed form: -beta * ((1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)), opposite for y_l
    h = (pc - rc - (pr - rr)).detach().double()
    expected = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
    torch.testing.assert_close(pc.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), -expected, rtol=1e-5, atol=1e-6)


def test_large_beta_gradient_only_on_misordered_pairs():
    """As beta grows, sigmoid(-beta h) -> step(h < 0): the gradient per unit beta is -1 on pairs the
    policy orders wrongly and 0 on pairs it already orders right (the logistic loss becomes a hinge)."""
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)  # h = +1 (right), -2 (wrong)
    dpo_loss(preference_logits(pc, PR, RC, RR), beta=50.0).sum().backward()
    assert (pc.grad / 50.0).tolist() == pytest.approx([0.0, -1.0], abs=1e-12)


def test_ipo_gradient_by_hand():
    pc = PC.clone().requires_grad_()
    ipo_loss(preference_logits(pc, PR, RC, RR), beta=0.1).sum().backward()
    # dL/dh = 2 (h - 5): 2 * (1 - 5) = -8, 2 * (-2 - 5) = -14
    assert pc.grad.tolist() == pytest.approx([-8.0, -14.0])
