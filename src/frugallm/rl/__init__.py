"""Reinforcement learning with verifiable rewards: GRPO (``frugallm rl``)."""
