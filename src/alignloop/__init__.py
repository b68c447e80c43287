"""alignloop: the whole RLHF loop in one tool.

generate -> label (humans, simulated labellers, or an AI judge under a constitution)
-> consensus and pairs -> reward model -> PPO with a KL penalty (or DPO) -> evaluation.
"""

__version__ = "0.1.0"
