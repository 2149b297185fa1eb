"""Which modules LoRA adapts: the default target patterns and the rule that matches a pattern to a module
name. Torch-free, so the LoRA module (``frugallm.tune.lora``, over ``model.named_modules()``) and the cost
model (``frugallm.cost.finetune``, over the names a ``ModelConfig`` implies) read the same list and rule.

Module names are those of Hugging Face's ``DeepseekV3ForCausalLM`` and of this package's model, which
follows it (N a layer index, D an MTP depth counted from 0):
    model.layers.N.self_attn.{q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj}   MLA (q_proj in
        place of q_a_proj and q_b_proj when q_lora_rank is None; q_proj, k_proj, v_proj for the baselines)
    model.layers.N.mlp.{gate_proj, up_proj, down_proj}                  dense layers (the first k)
    model.layers.N.mlp.shared_experts.{gate_proj, up_proj, down_proj}  shared experts
    model.layers.N.mlp.experts         routed experts, stacked gate_up_proj [E, 2I, H], down_proj [E, H, I]
    model.layers.N.mlp.gate            the router: a raw [E, H] weight, not a linear
    model.mtp.D.{eh_proj, self_attn.*, mlp.*}   MTP module D (block layer index num_hidden_layers + D)
    model.embed_tokens, lm_head, and the norms (*_layernorm, model.norm, enorm, hnorm, shared_head.norm)

Pattern rule (``pattern_matches``): a plain pattern matches a module whose dotted name is the pattern or
ends with ``"." + pattern``, a dot boundary, so ``"o_proj"`` matches ``model.layers.3.self_attn.o_proj``
and ``"mlp.experts"`` the routed experts of every MoE layer, while ``"experts"`` does not match
``mlp.shared_experts`` and ``"gate"`` matches only the router, never ``gate_proj``. ``"re:<regex>"``
matches names the regex matches in full (``"re:model\\.layers\\.[0-2]\\..*_proj"``).

``DEFAULT_TARGETS`` is every projection of MLA, of the dense MLPs and shared experts, and the routed
experts: every linear layer of the decoder blocks. It spans every layout, so its patterns that name
nothing in a given model (``q_proj`` where the query is compressed, ``mlp.experts`` in a dense model) are
skipped; any other pattern that matches no module is an error. Never targeted: the router (routing stays
as trained), the norms, the embedding, and the output head (``NEVER_TARGETED``: the fused loss reads its
weight directly, so an adapter there would be bypassed). The MTP modules (names under ``MTP_PREFIX``) are
left out by default: Hugging Face's model drops them on load, so an adapter on them could not be exported
or served there, and fine-tuning targets the next-token model; adapting them is an explicit choice.
"""

from __future__ import annotations

import re

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",  # MLA
    "gate_proj", "up_proj", "down_proj",  # dense MLPs and shared experts
    "mlp.experts",  # routed experts: one adapter per expert for gate_up and for down
)
NEVER_TARGETED: tuple[str, ...] = ("lm_head",)
MTP_PREFIX = "model.mtp."
REGEX_PREFIX = "re:"


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` selects the module called ``name`` (module docstring)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    return name == pattern or name.endswith("." + pattern)


def invalid_pattern(pattern: object) -> str | None:
    """Why ``pattern`` is not a usable target pattern, or None when it is."""
    if not isinstance(pattern, str) or not pattern:
        return f"{pattern!r} is not a non-empty string"
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as e:
            return f"{pattern!r} is not a valid regular expression ({e})"
    return None


def is_mtp(name: str) -> bool:
    return name.startswith(MTP_PREFIX)


def layer_pattern(name: str) -> str:
    """``name`` with its layer and depth indices as N, to list which names exist without 61 copies."""
    return re.sub(r"\.\d+\.", ".N.", name)


__all__ = ["DEFAULT_TARGETS", "MTP_PREFIX", "NEVER_TARGETED", "REGEX_PREFIX", "invalid_pattern", "is_mtp",
           "layer_pattern", "pattern_matches"]
