"""Verifiable reward functions: pure, fast, importable without torch, vLLM or Ray."""

from rewards.types import RewardResult

__all__ = ["RewardResult"]
