"""The PPO maths against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.rl.advantages import gae, last_token_index, token_rewards
from alignloop.rl.kl import adaptive_beta, kl_full, kl_k1, kl_k2, kl_k3, kl_per_token
from alignloop.rl.losses import (
    approx_kl,
    entropy_from_logits,
    explained_variance,
    policy_loss,
    ppo_loss,
    value_loss,
)
from alignloop.rl.masked import masked_mean, masked_whiten

T = torch.tensor


def close(a, b, tol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0
    )


# ---- GAE ------------------------------------------------------------------------------------


def test_gae_by_hand():
    # gamma=0.9, lam=0.8, rewards [1, 0, 2], values [1, 2, 3]:
    # t2: delta = 2 - 3 = -1;            A2 = -1
    # t1: delta = 0 + .9*3 - 2 = 0.7;    A1 = 0.7 + .72 * -1 = -0.02
    # t0: delta = 1 + .9*2 - 1 = 1.8;    A0 = 1.8 + .72 * -0.02 = 1.7856
    adv, ret = gae(T([[1.0, 0.0, 2.0]]), T([[1.0, 2.0, 3.0]]), T([[1, 1, 1]]), gamma=0.9, lam=0.8)
    close(adv, [[1.7856, -0.02, -1.0]])
    close(ret, [[2.7856, 1.98, 2.0]])


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    rewards, values = T([[0.5, -1.0, 3.0]]), T([[0.2, 0.1, -0.4]])
    adv, ret = gae(rewards, values, T([[1, 1, 1]]), gamma=1.0, lam=1.0)
    close(ret, [[2.5, 2.0, 3.0]])  # undiscounted reward-to-go
    close(adv, [[2.3, 1.9, 3.4]])


def test_gae_skips_padding_left_and_right():
    rewards, values = T([1.0, 0.0, 2.0]), T([1.0, 2.0, 3.0])
    right_r = torch.cat([rewards, T([9.0, 9.0])])[None]
    right_v = torch.cat([values, T([7.0, 7.0])])[None]
    left_r = torch.cat([T([9.0, 9.0]), rewards])[None]
    left_v = torch.cat([T([7.0, 7.0]), values])[None]
    adv_r, ret_r = gae(right_r, right_v, T([[1, 1, 1, 0, 0]]), gamma=0.9, lam=0.8)
    adv_l, ret_l = gae(left_r, left_v, T([[0, 0, 1, 1, 1]]), gamma=0.9, lam=0.8)
    close(adv_r, [[1.7856, -0.02, -1.0, 0.0, 0.0]])
    close(adv_l, [[0.0, 0.0, 1.7856, -0.02, -1.0]])
    close(ret_r[0, :3], ret_l[0, 2:])
    # a hole in the middle (e.g. a masked-out token) is skipped: the next real token follows
    adv_h, _ = gae(T([[1.0, 9.0, 0.0, 2.0]]), T([[1.0, 7.0, 2.0, 3.0]]), T([[1, 0, 1, 1]]), 0.9, 0.8)
    close(adv_h, [[1.7856, 0.0, -0.02, -1.0]])


# ---- reward placement at EOS -------------------------------------------------------------------


def test_last_token_index_left_and_right_padding():
    mask = T([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_score_is_placed_on_the_eos_token_not_after_it():
    # right padding: response "a b <eos> <pad> <pad>"; left padding: "<pad> <pad> a b <eos>"
    kl = torch.full((2, 5), 0.1)
    mask = T([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    rewards, non_score = token_rewards(T([2.0, -1.0]), kl, mask, beta=0.5)
    close(rewards, [[-0.05, -0.05, 1.95, 0.0, 0.0], [0.0, 0.0, -0.05, -0.05, -1.05]])
    close(non_score, [[-0.05, -0.05, -0.05, 0.0, 0.0], [0.0, 0.0, -0.05, -0.05, -0.05]])


# ---- policy loss ------------------------------------------------------------------------------


def test_clipped_policy_loss_by_hand():
    # ratios [1.5, 0.5, 1.0, 0.5], advantages [1, 1, -2, -1], eps 0.2; a padded 5th token is huge.
    # t0: -1.5 vs -1.2 -> -1.2 (clipped)   t1: -0.5 vs -0.8 -> -0.5
    # t2:  2.0 vs  2.0 ->  2.0             t3:  0.5 vs  0.8 ->  0.8 (clipped)
    ratio = T([[1.5, 0.5, 1.0, 0.5, 100.0]])
    old = T([[-1.0, -2.0, -0.3, -0.7, -1.0]])
    adv = T([[1.0, 1.0, -2.0, -1.0, 50.0]])
    mask = T([[1, 1, 1, 1, 0]])
    loss, clip_frac = policy_loss(old + ratio.log(), old, adv, mask, clip_eps=0.2)
    close(loss, (-1.2 - 0.5 + 2.0 + 0.8) / 4)
    close(clip_frac, 0.5)


def test_policy_loss_gradient_vanishes_outside_the_trust_region():
    logprobs = T([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), T([[1.0, 1.0]]), T([[1, 1]]), clip_eps=0.2)
    loss.backward()
    # clipped token: no gradient; inside: d/dlogp (-ratio * A) / 2 = -1.1 / 2
    close(logprobs.grad, [[0.0, -0.55]])


# ---- value loss, entropy, total ----------------------------------------------------------------


def test_clipped_value_loss_by_hand():
    # t0: (1-2)^2 = 1, V_clip = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # t1: (2-0)^2 = 4, V_clip = 2.0 -> 4 -> 4;  loss = 0.5 * (1.69 + 4) / 2
    values, old, ret = T([[1.0, 2.0, 5.0]]), T([[0.5, 2.0, 0.0]]), T([[2.0, 0.0, -5.0]])
    mask = T([[1, 1, 0]])
    loss, frac = value_loss(values, old, ret, mask, clip_range=0.2)
    close(loss, 0.5 * (1.69 + 4.0) / 2)
    close(frac, 0.5)
    loss_unclipped, _ = value_loss(values, old, ret, mask, clip_range=None)
    close(loss_unclipped, 0.5 * (1.0 + 4.0) / 2)


def test_entropy_by_hand():
    logits = T([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # p = [.5, .5] and [.25, .75]
    h = entropy_from_logits(logits)
    close(h, [[math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    close(entropy_from_logits(T([[[0.0, 0.0, 0.0, 0.0]]])), [[math.log(4.0)]])


def test_total_loss_subtracts_entropy():
    close(ppo_loss(T(1.0), T(2.0), T(3.0), vf_coef=0.1, ent_coef=0.01), 1.0 + 0.2 - 0.03)


# ---- KL ---------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    lp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    close(kl_k1(lp, ref), [[math.log(2.0)]])
    close(kl_k2(lp, ref), [[0.5 * math.log(2.0) ** 2]])
    close(kl_k3(lp, ref), [[(0.5 - 1.0) + math.log(2.0)]])  # rho = .25/.5
    close(kl_per_token(lp, ref, "k3"), kl_k3(lp, ref))
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k9")


def test_k1_and_k3_are_unbiased_against_exact_kl():
    # p = [.5, .5], q = [.25, .75]: KL = .5 ln 2 + .5 ln(2/3)
    p, q = T([0.5, 0.5]), T([0.25, 0.75])
    exact = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    close(kl_full(p.log()[None, None], q.log()[None, None]), [[exact]])
    for est in (kl_k1, kl_k3):
        expectation = (p * est(p.log(), q.log())).sum()
        close(expectation, exact)


def test_adaptive_beta_by_hand():
    # e = clip(12/6 - 1, -.2, .2) = .2 -> beta * (1 + .2 * 256 / 10000)
    assert adaptive_beta(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=256) == pytest.approx(0.100512)
    # e = 5.4/6 - 1 = -.1 -> beta * (1 - .1 * 256 / 10000)
    assert adaptive_beta(0.1, kl=5.4, target=6.0, horizon=10000, n_steps=256) == pytest.approx(0.099744)


def test_approx_kl_to_rollout_policy():
    old, new = T([[math.log(0.5), 0.0]]), T([[math.log(0.25), 0.0]])
    close(approx_kl(new, old, T([[1, 0]])), (0.5 - 1.0) + math.log(2.0))
    close(approx_kl(old, old, T([[1, 1]])), 0.0)


# ---- masked statistics --------------------------------------------------------------------------


def test_masked_whiten_and_mean_ignore_padding():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    close(masked_mean(x, mask), 2.0)
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)  # unbiased var = 1
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)
    close(masked_mean(x, T([[0, 0, 0, 0]]), dim=1), [0.0])


def test_explained_variance():
    ret, mask = T([[1.0, 2.0, 3.0]]), T([[1, 1, 1]])
    close(explained_variance(ret, ret, mask), 1.0)
    close(explained_variance(torch.zeros(1, 3), ret, mask), 0.0)
    close(explained_variance(T([[2.0, 2.0, 2.0]]), ret, mask), 0.0)
