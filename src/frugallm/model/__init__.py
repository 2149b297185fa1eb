"""The DeepSeek-V3 architecture: MLA attention, DeepSeekMoE, multi-token prediction."""

from frugallm.model.transformer import DeepseekV3LM, TrainOutput, build_model

__all__ = ["DeepseekV3LM", "TrainOutput", "build_model"]
