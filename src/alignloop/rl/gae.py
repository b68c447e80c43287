"""Moved to :mod:`alignloop.rl.advantages` (every advantage estimator in one file); this name keeps working."""

from alignloop.rl.advantages import gae, last_token_index, token_rewards

__all__ = ["gae", "last_token_index", "token_rewards"]
