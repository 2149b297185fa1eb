"""The serving engine on CPU mock models: absorbed decode against the expanded path, the latent cache size,
speculative decoding, prefix caching (with disk spill), continuous batching and the block pool's bounds."""

from __future__ import annotations

import pytest
import torch

from frugallm.config import ModelConfig, preset
from frugallm.cost.memory import kv_cache_bytes, kv_cache_bytes_per_token
from frugallm.model import build_model
from frugallm.serve.cache import BlockPool, CacheLayout, cache_bytes_per_token, chain_hash
from frugallm.serve.engine import Engine, EngineConfig
from frugallm.serve.runner import Row
from frugallm.serve.sampling import QueueFullError, RequestError, SamplingParams
from shapes import SERVE_TINY

TINY = SERVE_TINY
pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def tiny(**changes) -> torch.nn.Module:
    return build_model(ModelConfig(**{**TINY, **changes}), seed=1).eval()


def prompt(n: int, seed: int = 0, vocab: int = 96) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by re-running the whole sequence through the training forward every step."""
    ids, logits = list(ids), []
    for _ in range(n):
        lg = model(torch.tensor([ids]))[0, -1]
        logits.append(lg)
        ids.append(int(lg.argmax()))
    return ids[-n:], logits


def engine(model, **cfg) -> Engine:
    cfg.setdefault("block_size", 8)
    cfg.setdefault("cache_memory", 1 << 20)
    return Engine(model, None, EngineConfig(**cfg))


@pytest.fixture(scope="module")
def mtp_model():
    """A tiny model with an MTP module trained for a few seconds on a cycle with a little noise, so that the
    MTP drafts are right often but not always."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "num_nextn_predict_layers": 1, "initializer_range": 0.05}), seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    cycle = torch.tensor(prompt(13, seed=5))
    for _ in range(60):
        starts = torch.randint(0, 13, (8,), generator=gen)
        batch = cycle[(starts[:, None] + torch.arange(26)) % 13]  # [8, 26]
        noise = torch.rand(batch.shape, generator=gen) < 0.05
        batch = torch.where(noise, torch.randint(0, 96, batch.shape, generator=gen), batch)
        out = model.forward_train(batch)
        loss = out.loss + 0.3 * sum(out.mtp_losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cycle.tolist()


# ----- the latent cache and the absorbed decode ------------------------------------------------------------
VARIANTS = {
    "v3": {},
    # the other RoPE layout and V2's softmax routing serve through the same cache and absorbed decode
    "halves-rope": {"rope_interleave": False},
    "v2-group-limited": {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False,
                         "n_group": 2, "topk_group": 1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_cached_decode_matches_full_forward_every_step(mode: str, variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    ids = prompt(20)
    ref_tokens, ref_logits = reference_greedy(model, ids, 64)
    eng = engine(model, decode_attention=mode, record_logits=True)
    out = eng.generate([ids], SamplingParams(max_tokens=64, temperature=0))[0]
    assert len(out.logits) == 64
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref_logits, strict=True))
    assert worst <= 1e-4, f"{mode}: max |logits difference| {worst:.2e}"
    assert out.token_ids == ref_tokens


def test_absorbed_equals_expanded_decode_batched() -> None:
    """Several sequences of different lengths decoded together (padding, masks): both paths agree."""
    model = tiny()
    prompts = [prompt(n, seed=n) for n in (5, 17, 30)]
    outs = {}
    for mode in ("absorbed", "expanded"):
        eng = engine(model, decode_attention=mode, record_logits=True)
        outs[mode] = eng.generate(prompts, GREEDY)
    for a, b in zip(outs["absorbed"], outs["expanded"], strict=True):
        assert a.token_ids == b.token_ids
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True)) <= 1e-4


def test_cache_holds_only_the_latent() -> None:
    model = tiny()
    cfg = model.config
    eng = engine(model)
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert eng.pool.data.shape[-1] == width
    assert eng.cache_bytes_per_token == width * cfg.num_hidden_layers * 4
    # the published model in bf16: (512 + 64) * 61 * 2 bytes (DeepSeek-V2 paper; REFERENCE.md)
    assert cache_bytes_per_token(preset("deepseek-v3"), torch.bfloat16) == 70_272
    mha = preset("tiny-dense")
    assert cache_bytes_per_token(mha, torch.bfloat16) == (
        2 * mha.num_attention_heads * (mha.qk_head_dim + mha.v_head_dim) // 2 * mha.num_hidden_layers * 2)


@pytest.mark.parametrize("name, dtype", [("tiny", torch.float32), ("deepseek-v3", torch.bfloat16),
                                         ("tiny-dense", torch.bfloat16)])
def test_cache_size_equals_the_cost_model(name: str, dtype: torch.dtype) -> None:
    cfg = preset(name)
    assert cache_bytes_per_token(cfg, dtype) == kv_cache_bytes_per_token(cfg, dtype)


def test_pool_allocates_what_the_cost_formula_says(mtp_model) -> None:
    """The pool's bytes per slot, with and without the MTP block's layer, are ``cost.memory.kv_cache_bytes``
    (the one formula), as is the published DeepSeek-V3 figure (REFERENCE.md)."""
    model, _ = mtp_model
    cfg = model.config
    for spec in (False, True):
        eng = engine(model, speculative=spec)
        per_slot = kv_cache_bytes(cfg, torch.float32, layers=cfg.num_hidden_layers + int(spec))
        assert eng.pool.total_bytes == eng.pool.n_blocks * 8 * per_slot
        assert eng.cache_bytes_per_token == kv_cache_bytes(cfg, torch.float32)  # the main model's context
    v3 = preset("deepseek-v3")
    assert kv_cache_bytes(v3, "bf16") == (512 + 64) * 61 * 2 == 70_272
    assert cache_bytes_per_token(v3, torch.bfloat16, with_mtp=True) == (512 + 64) * 62 * 2


def test_mha_baseline_serves_with_a_plain_kv_cache() -> None:
    model = tiny(attention="mha", q_lora_rank=None)
    ids = prompt(11)
    ref, _ = reference_greedy(model, ids, 24)
    outs = engine(model).generate([ids, prompt(7, seed=3)], GREEDY)
    assert outs[0].token_ids == ref


# ----- speculative decoding ----------------------------------------------------------------------------------
def test_speculative_greedy_equals_plain_greedy(mtp_model) -> None:
    model, cycle = mtp_model
    prompts = [cycle[:9], cycle[3:] + cycle[:6], prompt(12, seed=7), prompt(20, seed=8)]
    params = SamplingParams(max_tokens=40, temperature=0)
    plain = engine(model, speculative=False).generate(prompts, params)
    spec_engine = engine(model, speculative=True)
    spec = spec_engine.generate(prompts, params)
    for p, s, ids in zip(plain, spec, prompts, strict=True):
        assert s.token_ids == p.token_ids
        assert s.token_ids == reference_greedy(model, ids, 40)[0]
    stats = spec_engine.stats()
    assert stats["draft_tokens"] > 0
    rate = stats["acceptance_rate"]
    print(f"MTP acceptance rate {rate:.2f} over {stats['draft_tokens']} drafts")
    assert rate > 0.5  # accepted drafts and bonus tokens (rejections: the untrained test below)
    assert sum(s.usage.accepted_draft_tokens for s in spec) == stats["accepted_draft_tokens"]
    # fewer forward passes than tokens: that is the point
    assert stats["steps"] < sum(len(s.token_ids) for s in spec)


@torch.no_grad()
def test_runner_mtp_equals_the_modules_own_forward(mtp_model) -> None:
    """The runner's MTP block over the cache (a prefill, then one position at a time) against
    ``MTPModule.forward`` over the whole sequence, as training runs it."""
    model, cycle = mtp_model
    ids = torch.tensor([cycle[:12]])  # [1, 12]
    S = 11
    h, _ = model.hidden(ids[:, :S])  # [1, S, H]
    ref, _ = model.model.mtp[0](h, model.model.embed_tokens(ids[:, 1 : S + 1]), model.rope(S))  # [1, S, H]
    eng = engine(model, speculative=True)
    table = [eng.pool.allocate(reserved=False) for _ in range(2)]  # 16 slots: the MTP rows sit one slot later
    got = [eng.runner.mtp(h[:, :6], ids[:, 1:7], [Row(table, 0, 6, 0)], prefill=True)]
    for p in range(6, S):
        got.append(eng.runner.mtp(h[:, p : p + 1], ids[:, p + 1 : p + 2], [Row(table, p, 1, p)], prefill=False))
    assert (torch.cat(got, dim=1) - ref).abs().max().item() <= 1e-5


def test_speculative_untrained_drafts_still_exact() -> None:
    """Drafts that are mostly wrong: each is corrected, drafting pauses, and when it resumes the MTP block
    catches up on the positions it skipped; the tokens never change."""
    model = tiny(num_nextn_predict_layers=1)
    prompts = [prompt(9, seed=1), prompt(26, seed=2), prompt(3, seed=4)]
    params = SamplingParams(max_tokens=60, temperature=0)
    plain = engine(model, speculative=False).generate(prompts, params)
    spec_engine = engine(model)
    spec = spec_engine.generate(prompts, params)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    stats = spec_engine.stats()
    assert stats["acceptance_rate"] < 0.5  # mostly rejected drafts, each corrected
    assert stats["draft_pauses"] >= 3
    # drafting resumed after the pause: more drafts than one window per sequence
    assert stats["draft_tokens"] > 3 * 4


def test_sampling_is_seed_reproducible(mtp_model) -> None:
    model, cycle = mtp_model
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, top_k=20, seed=1234)
    for spec in (False, True):
        a = engine(model, speculative=spec).generate([cycle[:5]], params)[0].token_ids
        b = engine(model, speculative=spec).generate([cycle[:5]], params)[0].token_ids
        assert a == b
    other = engine(model).generate([cycle[:5]], SamplingParams(**{**params.__dict__, "seed": 99}))[0].token_ids
    assert len(other) == 30


# ----- prefix caching ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_prefix_cache_hits_and_gives_the_same_output(speculative: bool) -> None:
    model = tiny(num_nextn_predict_layers=1)
    shared = prompt(35, seed=11)
    first, second = shared + prompt(4, seed=12), shared + prompt(6, seed=13)
    cold = engine(model, prefix_cache=False, speculative=speculative)
    expected = cold.generate([second], GREEDY)[0]
    eng = engine(model, speculative=speculative)
    a = eng.generate([first], GREEDY)[0]
    assert a.usage.prompt_cache_hit_tokens == 0 and a.usage.prompt_cache_miss_tokens == len(first)
    b = eng.generate([second], GREEDY)[0]
    assert b.usage.prompt_cache_hit_tokens == 32  # the four full blocks of 8 inside the shared 35 tokens
    assert b.usage.prompt_cache_miss_tokens == len(second) - 32
    assert b.token_ids == expected.token_ids
    # the same prompt again: every full block but the one holding the last token hits
    c = eng.generate([second], GREEDY)[0]
    assert c.usage.prompt_cache_hit_tokens == (len(second) - 1) // 8 * 8
    assert c.token_ids == expected.token_ids


def test_prefix_blocks_are_shared_by_running_sequences() -> None:
    model = tiny()
    shared = prompt(24, seed=3)
    eng = engine(model)
    eng.generate([shared + [1]], SamplingParams(max_tokens=2, temperature=0))
    outs = eng.generate([shared + [2, 3], shared + [4]], SamplingParams(max_tokens=20, temperature=0))
    assert all(o.usage.prompt_cache_hit_tokens == 24 for o in outs)
    assert eng.pool.used_blocks() == 0  # everything returned; full blocks wait in the LRU
    assert len(eng.pool.lru) > 0


def test_lru_eviction_and_disk_spill(tmp_path) -> None:
    model = tiny()
    bpt = engine(model).cache_bytes_per_token
    a, b, c = prompt(40, seed=21), prompt(40, seed=22), prompt(40, seed=23)
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = engine(model, prefix_cache=False).generate([a + [5]], params)[0].token_ids
    # room for one request at a time: each evicts the one before (LRU: a prefix's tail goes before its head)
    budget = bpt * 8 * 7
    eng = engine(model, cache_memory=budget, spill_dir=str(tmp_path / "spill"))
    assert eng.pool.n_blocks == 7
    for p in (a, b, c):
        eng.generate([p], params)
    assert eng.pool.evictions >= 5 and eng.pool.spill.writes >= 5
    again = eng.generate([a + [5]], params)[0]
    assert again.usage.prompt_cache_hit_tokens == 40 and eng.pool.spill.reads == 5
    assert again.token_ids == expected
    # a fresh engine on the same model finds the blocks an earlier one spilled
    fresh = engine(model, cache_memory=budget, spill_dir=str(tmp_path / "spill"))
    out = fresh.generate([a + [5]], params)[0]
    assert out.usage.prompt_cache_hit_tokens == 40 and out.token_ids == expected
    # without a spill directory evicted prefixes are gone
    eng2 = engine(model, cache_memory=budget)
    for p in (a, b, c):
        eng2.generate([p], params)
    assert eng2.generate([a + [5]], params)[0].usage.prompt_cache_hit_tokens == 0


def test_spill_is_never_read_by_another_model(tmp_path) -> None:
    params = SamplingParams(max_tokens=2, temperature=0)
    ids = prompt(40, seed=4)
    m1 = tiny()
    budget = engine(m1).cache_bytes_per_token * 8 * 7
    eng = engine(m1, cache_memory=budget, spill_dir=str(tmp_path))
    eng.generate([ids], params)
    eng.generate([prompt(40, seed=5)], params)
    assert eng.pool.spill.writes > 0
    m2 = build_model(ModelConfig(**TINY), seed=9).eval()
    other = engine(m2, cache_memory=budget, spill_dir=str(tmp_path))
    assert other.generate([ids], params)[0].usage.prompt_cache_hit_tokens == 0


# ----- batching, bounds, aborts ----------------------------------------------------------------------------------
def test_continuous_batching_joins_and_leaves_between_steps() -> None:
    model = tiny()
    prompts = [prompt(n, seed=n) for n in (6, 13, 21)]
    lengths = [5, 30, 12]
    expected = [reference_greedy(model, p, n)[0] for p, n in zip(prompts, lengths, strict=True)]
    eng = engine(model, max_batch=8)
    rids = [eng.submit(prompts[0], SamplingParams(max_tokens=lengths[0], temperature=0))]
    got: dict[str, list[int]] = {}
    batch_sizes = []
    for step in range(200):
        if step == 3:  # joins while the first is running
            rids.append(eng.submit(prompts[1], SamplingParams(max_tokens=lengths[1], temperature=0)))
        if step == 10:
            rids.append(eng.submit(prompts[2], SamplingParams(max_tokens=lengths[2], temperature=0)))
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        batch_sizes.append(len(eng.running))
        if step > 10 and not eng.has_work():
            break
    assert [got[r] for r in rids] == expected
    assert max(batch_sizes) >= 2
    assert eng.pool.used_blocks() == 0 and eng.pool.reserved == 0


def test_requests_that_cannot_fit_are_refused_clearly() -> None:
    model = tiny()
    eng = engine(model, cache_memory=engine(model).cache_bytes_per_token * 8 * 4)  # 4 blocks of 8 tokens
    with pytest.raises(RequestError, match="KV cache blocks") as e:
        eng.submit(prompt(20), SamplingParams(max_tokens=20))
    assert e.value.code == "cache_capacity_exceeded"
    with pytest.raises(RequestError, match="maximum context length") as e:
        eng.submit(prompt(256), SamplingParams(max_tokens=1))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="max_tokens"):
        eng.submit(prompt(200), SamplingParams(max_tokens=100))
    # what fits is served, one after another when two do not fit together
    outs = eng.generate([prompt(10, seed=1), prompt(10, seed=2)], SamplingParams(max_tokens=10, temperature=0))
    assert [len(o.token_ids) for o in outs] == [10, 10]


def test_bounded_queue_and_abort_free_blocks() -> None:
    model = tiny()
    eng = engine(model, max_batch=1, max_queue=2)
    a = eng.submit(prompt(10), SamplingParams(max_tokens=50))
    eng.submit(prompt(10, seed=1), SamplingParams(max_tokens=50))
    with pytest.raises(QueueFullError):
        eng.submit(prompt(10, seed=2), SamplingParams(max_tokens=50))
    eng.step()
    eng.step()
    assert eng.pool.used_blocks() > 0
    eng.abort(a)
    outs = eng.step()
    assert any(o.request_id == a and o.finish_reason == "abort" for o in outs)
    while eng.has_work():
        eng.step()
    assert eng.pool.used_blocks() == 0 and eng.pool.reserved == 0


def test_block_pool_accounting() -> None:
    layout = CacheLayout(n_layers=2, width=4, dtype=torch.float32)
    pool = BlockPool(layout, block_size=4, n_blocks=3)
    pool.reserve(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert pool.available() == 0 and sorted(blocks) == [0, 1, 2]
    h = chain_hash(pool.root, [1, 2, 3, 4])
    pool.register(blocks[0], h)
    pool.release_all(blocks)
    assert pool.available() == 3 and len(pool.lru) == 1
    pool.reserve(1)
    assert pool.lookup(h) == blocks[0] and pool.reserved == 0
    assert pool.refs[blocks[0]] == 1 and len(pool.lru) == 0
    assert chain_hash(pool.root, [1, 2, 3, 4]) != chain_hash(chain_hash(pool.root, [0]), [1, 2, 3, 4])


# ----- log-probabilities of the sampled tokens, and weights that change under the engine ---------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_logprobs_equal_the_training_forward(mtp_model, speculative):
    """Each reported log-probability (and its top-k) is log-softmax of the full forward's logits at temperature
    1 at that position, sampled at temperature 0.8, with or without MTP drafting."""
    model, cycle = mtp_model
    eng = engine(model, speculative=speculative)
    p = SamplingParams(max_tokens=12, temperature=0.8, seed=3, logprobs=3, ignore_eos=True)
    (c,) = eng.generate([cycle[:6]], p)
    assert len(c.logprobs) == len(c.token_ids) == 12
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([cycle[:6] + c.token_ids]))[0].float(), -1)  # [T, V]
    for i, (tok, rec) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        assert rec.token == tok
        assert rec.logprob == pytest.approx(float(lp[5 + i, tok]), abs=1e-4)
        top_vals, top_ids = lp[5 + i].topk(3)
        assert [t for t, _ in rec.top] == top_ids.tolist()
        assert [v for _, v in rec.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_logprobs_are_off_by_default_and_bounded():
    eng = engine(tiny())
    (c,) = eng.generate([prompt(5)], SamplingParams(max_tokens=3, temperature=0))
    assert c.logprobs == [] and c.eos is None
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_the_eos_token_it_stopped_at_keeps_its_logprob():
    model = tiny()
    eng = Engine(model, None, EngineConfig(block_size=8, cache_memory=1 << 20))
    (c,) = eng.generate([prompt(5)], SamplingParams(max_tokens=1, temperature=0, logprobs=0))
    first = c.token_ids[0]
    eng.eos_ids = {first}  # the greedy first token is now the end of sequence
    (c,) = eng.generate([prompt(5)], SamplingParams(max_tokens=4, temperature=0, logprobs=0))
    assert c.token_ids == [] and c.finish_reason == "stop"
    assert c.eos is not None and c.eos.token == first and c.eos.logprob < 0


def test_weights_updated_drops_the_prefix_cache():
    """After the weights change in place, a repeated prompt is computed again with the new weights (no stale
    prefix block), and its output is what a fresh engine on the new weights gives."""
    model = tiny()
    eng = engine(model)
    shared = prompt(40, seed=4)
    eng.generate([shared], GREEDY)
    eng.generate([shared], GREEDY)
    assert eng.counters["cache_hit_tokens"] > 0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    eng.weights_updated()
    hits = eng.counters["cache_hit_tokens"]
    (after,) = eng.generate([shared], GREEDY)
    assert eng.counters["cache_hit_tokens"] == hits
    (fresh,) = engine(model).generate([shared], GREEDY)
    assert after.token_ids == fresh.token_ids
    eng.submit(shared, GREEDY)
    with pytest.raises(RuntimeError, match="in flight"):
        eng.weights_updated()


# ----- prompt log-probabilities (echo, lm-evaluation-harness's scoring) ------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_prompt_logprobs_equal_the_training_forward_with_and_without_the_prefix_cache(mtp_model, speculative):
    """Every prompt token's log-probability (the first has none) and top-k equal log-softmax of the full
    forward; a second prompt sharing the first's context takes that context from the prefix cache (hits) and
    its context positions still come back, equal to the forward's; max_tokens 0 samples nothing."""
    model, cycle = mtp_model
    eng = engine(model, speculative=speculative)
    ctx = prompt(37, seed=9)
    for cont in ([5, 6, 7], [8, 9]):
        ids = ctx + cont
        hits = eng.counters["cache_hit_tokens"]
        (c,) = eng.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))
        assert c.token_ids == [] and c.finish_reason == "length"
        assert len(c.prompt_logprobs) == len(ids) and c.prompt_logprobs[0] is None
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # [T, V]
        for p in range(1, len(ids)):
            rec = c.prompt_logprobs[p]
            assert rec.token == ids[p]
            assert rec.logprob == pytest.approx(float(lp[p - 1, ids[p]]), abs=1e-4)
            assert [t for t, _ in rec.top] == lp[p - 1].topk(2).indices.tolist()
    assert eng.counters["cache_hit_tokens"] - hits == 32  # the second prompt's two full context blocks


def test_prompt_logprobs_then_generation_and_stop_token_ids():
    """echo with max_tokens 1, as lm-evaluation-harness asks: prompt log-probabilities plus one token; a stop
    token id ends generation like EOS."""
    model = tiny()
    eng = engine(model)
    ids = prompt(10)
    (c,) = eng.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, logprobs=0))
    assert len(c.prompt_logprobs) == 10 and len(c.logprobs) == 1
    (g,) = eng.generate([ids], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    (s,) = eng.generate([ids], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(g.token_ids[2],)))
    assert s.token_ids == g.token_ids[: g.token_ids.index(g.token_ids[2])] and s.finish_reason == "stop"
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_prompts_sharing_a_context_submitted_together_compute_it_once():
    """The choices of one question arrive in one batch: the first computes the shared context, the others
    wait for its blocks and take them from the prefix cache; the answers equal those computed alone."""
    model = tiny()
    ctx = prompt(33, seed=12)
    prompts = [ctx + [c, c + 1] for c in (3, 5, 7, 9)]
    p = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, logprobs=1)
    eng = engine(model)
    outs = eng.generate(prompts, p)
    assert [o.usage.prompt_cache_hit_tokens for o in outs] == [0, 32, 32, 32]
    for o, ids in zip(outs, prompts, strict=True):
        (alone,) = engine(model).generate([ids], p)
        assert [lp.logprob for lp in o.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in alone.prompt_logprobs[1:]], abs=1e-5)
        assert o.token_ids == alone.token_ids


# ----- the lean decode step ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 2, 5, 24])  # N*k = 2, 4 (<= E = 4: each chosen expert once), then padded
def test_serving_ffn_equals_the_blocks_own(tokens: int) -> None:
    from frugallm.serve.ffn import ffn_half

    model = tiny()
    x = torch.randn(1, tokens, TINY["hidden_size"], generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        for layer in model.model.layers:  # the dense first layer, then an MoE one
            assert torch.allclose(ffn_half(layer, x), layer.ffn(x)[0], atol=1e-6, rtol=1e-5)


def test_padded_experts_equal_the_grouped_path_and_give_way_to_it_on_a_skewed_routing() -> None:
    from frugallm.model.moe import GroupedExperts
    from frugallm.serve.ffn import _padded_experts

    g = torch.Generator().manual_seed(0)
    experts = GroupedExperts(16, 32, 24)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2, generator=g)
        experts.down_proj.normal_(0, 0.2, generator=g)
    x = torch.randn(24, 32, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(24)])  # N*k = 48 > E
    gates = torch.rand(24, 2, generator=g)
    with torch.inference_mode():
        want = experts(x, indices, gates)
        got = _padded_experts(experts, x, indices, gates)
        assert got is not None and torch.allclose(got, want, atol=1e-6, rtol=1e-5)
        skewed = indices.clone()
        skewed[:, 0] = 0  # every token on expert 0: 16 x 24 padded rows for 48 pairs
        assert _padded_experts(experts, x, skewed, gates) is None


def test_consecutive_blocks_are_read_as_a_view_and_others_gathered() -> None:
    from frugallm.serve.runner import paged_batch, store_and_gather

    cache = torch.randn(8 * 4, 3)  # 8 blocks of 4 slots
    rows = torch.randn(1, 1, 3)
    views = {}
    for table in ([2, 3, 4], [4, 2, 3]):
        batch = paged_batch([Row(table, 9, 1, 9)], block_size=4)
        assert (batch.key_start is not None) == (table == [2, 3, 4])
        c = cache.clone()
        views[tuple(table)] = (store_and_gather(c, rows, batch), c, batch)
    (a, ca, ba), (b, cb, bb) = views.values()
    assert a.data_ptr() == ca[8:].data_ptr()  # no copy of the context
    # both read what their slots hold: key p of table t is slot t[p // 4] * 4 + p % 4
    assert torch.equal(a[0], ca[ba.key_slots[0]]) and torch.equal(b[0], cb[bb.key_slots[0]])
    assert torch.equal(a[0, 9], rows[0, 0]) and torch.equal(b[0, 9], rows[0, 0])
