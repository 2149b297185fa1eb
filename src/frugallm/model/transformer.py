"""The DeepSeek-V3 language model: embedding, decoder blocks (MLA + DeepSeekMoE), final norm, output head,
and the multi-token-prediction modules.

``model(input_ids)`` returns the main logits [B, S, V]. ``model.forward_train(tokens)`` is the training
entry: ``tokens`` is [B, S + 1 + D] (D = num_nextn_predict_layers) and it returns the main next-token loss,
one loss per MTP depth, the unweighted balance loss summed over MoE layers, and each MoE layer's expert
load (main layers first, then MTP blocks), which the training loop hands to ``update_expert_bias``.

Supervised fine-tuning passes ``labels`` (``frugallm.tune.sft``'s batch contract): ``tokens`` is then the
input ids [B, S], labels [B, S] already shifted (-100 where untrained), and optionally ``segment_ids`` and
``position_ids`` [B, S] of packed rows. Then each packed example computes exactly what it would alone:
RoPE at its own positions, attention within its segment (``kernels.attention.SegmentMask``), MTP depth d
only where t + d is in t's example (``mtp.within_segment``), balance statistics per example without the
padding (``moe.TokenGroups``). ``reduction="sum"`` returns summed losses, with the counts they sum over in
``trained_tokens`` and ``mtp_trained_tokens``, for means weighted by tokens across batches.

Module names follow Hugging Face's ``DeepseekV3ForCausalLM`` (``model.layers.N.self_attn.kv_b_proj`` ...),
so checkpoint I/O is a rename of the MTP modules and a split or merge of the stacked experts at most.
Large models are built on the meta device and materialised by ``build_model``; ``init_weights`` lists the
initialisation of every parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.kernels import KernelPolicy, choose, install
from frugallm.kernels.attention import SegmentMask
from frugallm.model.attention import RopeTable, Rotary
from frugallm.model.block import DecoderLayer
from frugallm.model.layers import Linear, RMSNorm
from frugallm.model.loss import REDUCTIONS, linear_cross_entropy
from frugallm.model.moe import MoE, MoEStats, TokenGroups
from frugallm.model.mtp import MTPModule, within_segment


class TrainOutput(NamedTuple):
    loss: torch.Tensor  # main next-token cross-entropy (mean over trained tokens, or their sum)
    mtp_losses: list[torch.Tensor]  # one per MTP depth, reduced alike
    balance_loss: torch.Tensor  # unweighted, summed over MoE layers
    loads: torch.Tensor | None  # [n_moe_layers (+ MTP), E] tokens per expert, None without MoE
    trained_tokens: torch.Tensor | None = None  # int64 scalar: the labels ``loss`` reduces over
    mtp_trained_tokens: tuple[torch.Tensor, ...] = ()  # the same for each MTP depth
    aux_loss: torch.Tensor | None = None  # unweighted batch-wise auxiliary balance loss, summed over MoE layers


class Trunk(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPModule(cfg, d + 1) for d in range(cfg.num_nextn_predict_layers))


class DeepseekV3LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Trunk(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = Rotary(cfg)

    def tie_weights(self) -> None:
        """Share the embedding with the output head when configured (again after ``to_empty``, which
        materialises each module's parameters separately)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----- forward passes -----------------------------------------------------------------------------
    def rope(self, seq_len: int, offset: int = 0, device: torch.device | None = None,
             positions: torch.Tensor | None = None) -> RopeTable:
        """The table of positions offset .. offset+seq_len-1 [1, S, d_r/2], or of ``positions`` [B, S] per row
        (packed examples restart at 0) [B, S, d_r/2]."""
        if positions is not None:
            return self.rotary(positions)  # [B, S, d_r/2]
        pos = torch.arange(offset, offset + seq_len, device=device or self.lm_head.weight.device)
        cos, sin, interleaved = self.rotary(pos)  # [S, d_r/2]
        return RopeTable(cos.unsqueeze(0), sin.unsqueeze(0), interleaved)  # [1, S, d_r/2]

    def hidden(self, input_ids: torch.Tensor, *, rope: RopeTable | None = None, segments: SegmentMask | None = None,
               groups: TokenGroups | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
        """input_ids [B, S] -> last hidden state before the final norm [B, S, H], and MoE stats; ``rope``,
        ``segments`` and ``groups`` as packed rows need them (None: positions 0..S-1, causal, per row)."""
        x = self.model.embed_tokens(input_ids)  # [B, S, H]
        rope = rope or self.rope(input_ids.shape[1], device=input_ids.device)
        stats = []
        for layer in self.model.layers:
            x, s = layer(x, rope, segments, groups)
            if s is not None:
                stats.append(s)
        return x, stats

    def logits(self, h: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        return self.lm_head((norm or self.model.norm)(h))  # [B, S, V]

    def head_loss(self, h: torch.Tensor, norm: nn.Module, labels: torch.Tensor, ignore_index: int,
                  reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the output head on norm(h) [B, S, H] against labels [B, S], without keeping the
        logits (``frugallm.model.loss``)."""
        return linear_cross_entropy(norm(h), self.lm_head.weight, labels, ignore_index, self.lm_head.kernels,
                                    reduction)

    def forward(self, input_ids: torch.Tensor, train: bool = False, **train_args: Any) -> torch.Tensor | TrainOutput:
        """Main logits [B, S, V]; with ``train=True`` the same as ``forward_train`` (so that wrappers such as
        FSDP, whose hooks run on ``__call__``, see the training pass too), ``train_args`` its keywords."""
        if train:
            return self.forward_train(input_ids, **train_args)
        return self.logits(self.hidden(input_ids)[0])

    def forward_train(self, tokens: torch.Tensor, ignore_index: int = -100, *, labels: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      reduction: str = "mean") -> TrainOutput:
        """Pretraining (``labels`` None): tokens [B, S + 1 + D], every next token trained. Fine-tuning: tokens
        are the input ids [B, S] and ``labels`` [B, S] their shifted targets, ``segment_ids`` and
        ``position_ids`` [B, S] those of packed rows (None: one example a row at positions 0..S-1). Module doc."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if labels is None:
            if segment_ids is not None or position_ids is not None:
                raise ValueError("segment_ids and position_ids describe labelled rows: pass labels too")
            return self._pretrain(tokens, ignore_index, reduction)
        for name, t in (("labels", labels), ("segment_ids", segment_ids), ("position_ids", position_ids)):
            if t is not None and t.shape != tokens.shape:
                raise ValueError(f"{name} must be shaped like tokens {tuple(tokens.shape)}, got {tuple(t.shape)}")
        return self._labelled(tokens, labels, segment_ids, position_ids, ignore_index, reduction)

    def _pretrain(self, tokens: torch.Tensor, ignore_index: int, reduction: str) -> TrainOutput:
        D = len(self.model.mtp)
        S = tokens.shape[1] - 1 - D
        if S < 1:
            raise ValueError(f"forward_train needs [B, S + 1 + {D}] tokens with S >= 1, got {tuple(tokens.shape)}")
        h, stats = self.hidden(tokens[:, :S])
        labels = tokens[:, 1 : S + 1]
        loss = self.head_loss(h, self.model.norm, labels, ignore_index, reduction)
        mtp_losses, mtp_counts = [], []
        rope = self.rope(S, device=tokens.device)
        for d, module in enumerate(self.model.mtp, start=1):
            h, s = module(h, self.model.embed_tokens(tokens[:, d : S + d]), rope)
            if s is not None:
                stats.append(s)
            mtp_labels = tokens[:, d + 1 : S + d + 1]
            mtp_losses.append(self.head_loss(h, module.shared_head.norm, mtp_labels, ignore_index, reduction))
            mtp_counts.append((mtp_labels != ignore_index).sum())
        return self._output(loss, mtp_losses, stats, (labels != ignore_index).sum(), mtp_counts)

    def _labelled(self, tokens: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None,
                  position_ids: torch.Tensor | None, ignore_index: int, reduction: str) -> TrainOutput:
        segments = SegmentMask.of(segment_ids)  # None when causal attention is exact already
        seg = torch.ones_like(tokens) if segment_ids is None else segment_ids  # [B, S]
        groups = TokenGroups.of_segments(seg)
        rope = self.rope(tokens.shape[1], device=tokens.device, positions=position_ids)
        h, stats = self.hidden(tokens, rope=rope, segments=segments, groups=groups)
        loss = self.head_loss(h, self.model.norm, labels, ignore_index, reduction)
        mtp_losses, mtp_counts = [], []
        for d, module in enumerate(self.model.mtp, start=1):
            valid = within_segment(seg, d)  # [B, S] t + d in t's example
            # token t + d (wrapped around the row where it is invalid: never read by a valid position)
            h, s = module(h, self.model.embed_tokens(tokens.roll(-d, dims=1)), rope, segments, groups.only(valid))
            if s is not None:
                stats.append(s)
            mtp_labels = torch.where(valid, labels.roll(-d, dims=1), ignore_index)  # [B, S] labels[t + d]
            mtp_losses.append(self.head_loss(h, module.shared_head.norm, mtp_labels, ignore_index, reduction))
            mtp_counts.append((mtp_labels != ignore_index).sum())
        return self._output(loss, mtp_losses, stats, (labels != ignore_index).sum(), mtp_counts)

    @staticmethod
    def _output(loss: torch.Tensor, mtp_losses: list[torch.Tensor], stats: list[MoEStats],
                trained: torch.Tensor, mtp_trained: list[torch.Tensor]) -> TrainOutput:
        if stats:
            balance = torch.stack([s.balance_loss for s in stats]).sum()
            loads = torch.stack([s.load for s in stats])  # [n_moe, E]
            aux = torch.stack([s.aux_loss for s in stats]).sum()
        else:
            balance, loads, aux = loss.new_zeros(()), None, loss.new_zeros(())
        return TrainOutput(loss, mtp_losses, balance, loads, trained, tuple(mtp_trained), aux)

    # ----- balancing ----------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        """MoE modules in the order of ``TrainOutput.loads``: main layers, then MTP blocks."""
        blocks = list(self.model.layers) + list(self.model.mtp)
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def update_expert_bias(self, loads: torch.Tensor, gamma: float) -> None:
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.update_bias(load, gamma)

    # ----- initialisation -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every parameter's initialisation: matrices (linears, embedding, router, stacked experts) are
        N(0, initializer_range), as DeepSeek-V3 (std 0.006); norm weights are 1; the balancing bias is 0."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0, init: bool = True, kernels: KernelPolicy | None = None) -> DeepseekV3LM:
    """Build on the meta device, then allocate once on ``device`` and initialise (unless ``init`` is False,
    as when a checkpoint is loaded next). ``device="meta"`` gives a model that allocates nothing.
    ``kernels``: the kernel policy its layers run (``frugallm.kernels``); None chooses the one for
    ``device`` and ``dtype``. ``model.kernels`` holds it."""
    kernels = kernels or choose(device, dtype)
    with torch.device("meta"):
        model = DeepseekV3LM(cfg)
    install(model, kernels)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    model.tie_weights()
    if init:
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        model.init_weights(gen)
    return model.to(dtype)
