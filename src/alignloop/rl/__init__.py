"""PPO with a per-token KL penalty against a frozen reference.

One concept a file: :mod:`~alignloop.rl.masked` (statistics over real tokens),
:mod:`~alignloop.rl.kl` (KL estimators, adaptive beta), :mod:`~alignloop.rl.gae` (reward
placement, GAE), :mod:`~alignloop.rl.losses` (clipped policy loss, value loss, entropy) and
:mod:`~alignloop.rl.ppo` (the algorithm, top to bottom).
"""
