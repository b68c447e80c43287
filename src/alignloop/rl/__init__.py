"""Online RL for language models: PPO and the critic-free family (GRPO, Dr. GRPO, RLOO, REINFORCE++).

One concept a file: :mod:`~alignloop.rl.masked` (statistics over real tokens),
:mod:`~alignloop.rl.kl` (KL estimators, adaptive beta), :mod:`~alignloop.rl.advantages` (reward
placement, GAE, group-normalised, leave-one-out, batch-normalised returns), :mod:`~alignloop.rl.losses`
(clipped policy loss, value loss, entropy, k3 KL loss), :mod:`~alignloop.rl.rollout` (what every online
algorithm shares: sampling, scoring, reference log-probs, update mechanics, checkpoints, metrics), and one
file an algorithm, top to bottom: :mod:`~alignloop.rl.ppo`, :mod:`~alignloop.rl.grpo`.
"""
