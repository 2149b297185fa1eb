"""Small model shapes shared by several test modules (import as ``from shapes import ...``)."""

from __future__ import annotations

from frugallm.config import ModelConfig

# one dense layer then one MoE layer, as DeepSeek-V3's first_k_dense_replace: the cost model's checks
COST_SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1)

# a model the training loop trains for real in seconds, MTP included
MICRO = ModelConfig(vocab_size=320, hidden_size=48, num_hidden_layers=2, intermediate_size=96,
                    num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=12,
                    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                    first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128)

# `tiny` shrunk to train hundreds of steps in seconds on byte tokens (MLA, MoE, MTP as in `tiny`): the FP8
# training checks
FP8_SHRUNK_TINY = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, n_routed_experts=8,
                       moe_intermediate_size=128, intermediate_size=384, q_lora_rank=64, kv_lora_rank=32)

# the serving tests' model: large init so that greedy outputs are not all one token
SERVE_TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256,
                  initializer_range=0.2)

# a three-layer MoE with both MLA layouts' sizes, for the LoRA tests (tests/test_tune_lora*.py)
LORA_TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
                 num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1)
