"""Several LoRA adapters over one base model, mixed in the same batches: each row decodes exactly as its own
adapter's LoRA model (the training forward), and the prefix cache never shares blocks across adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from frugallm.config import ModelConfig
from frugallm.model import build_model
from frugallm.serve.adapters import MultiLoraLinear, attach_adapters
from frugallm.serve.engine import Engine, EngineConfig
from frugallm.serve.sampling import SamplingParams
from frugallm.tune.adapter import save_adapter
from frugallm.tune.lora import LoraConfig, apply_lora, lora_modules
from shapes import SERVE_TINY

pytestmark = pytest.mark.usefixtures("one_thread")
DENSE = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_model(base, tmp_path, name: str, seed: int, targets=DENSE):
    """A copy of ``base`` with a LoRA whose B factors are random (a trained adapter's are not zero), saved."""
    m = copy.deepcopy(base)
    cfg = LoraConfig(rank=2, alpha=4.0, targets=targets)
    apply_lora(m, cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            for pname, param in mod.named_parameters(recurse=False):  # LoraExperts' B factors
                if pname.startswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=g) * 0.3)
            if hasattr(mod, "lora_B"):
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.3)
    save_adapter(m, tmp_path / name, cfg)
    return m.eval()


@torch.no_grad()
def greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("decode_attention", ["absorbed", "expanded"])
def test_mixed_adapter_batches_equal_each_adapters_model(tmp_path, decode_attention) -> None:
    base = build_model(ModelConfig(**{**SERVE_TINY, "num_nextn_predict_layers": 1}), seed=4).eval()
    a1, a2 = lora_model(base, tmp_path, "one", 1), lora_model(base, tmp_path, "two", 2)
    served = copy.deepcopy(base)
    rows = attach_adapters(served, [("one", tmp_path / "one"), ("two", tmp_path / "two")])
    assert rows.names == ["one", "two"]
    assert isinstance(served.model.layers[0].self_attn.kv_b_proj, MultiLoraLinear)
    # drafting on (absorbed) and off (expanded): the base's MTP module drafts for adapted rows, and
    # verification keeps each row's output its adapter's
    spec = decode_attention == "absorbed"
    eng = Engine(served, None, EngineConfig(block_size=8, cache_memory=1 << 20, decode_attention=decode_attention,
                                            speculative=spec))
    assert eng.spec == spec
    prompt = torch.randint(0, 96, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    outs = eng.generate([prompt, prompt, prompt, prompt[:11]], p, adapters=[1, 2, 0, 1])
    refs = [greedy(a1, prompt, 6), greedy(a2, prompt, 6), greedy(base, prompt, 6), greedy(a1, prompt[:11], 6)]
    assert [o.token_ids for o in outs] == refs
    assert len({tuple(r) for r in refs[:3]}) > 1  # the adapters do change the output
    with torch.no_grad():
        lp = torch.log_softmax(a2(torch.tensor([prompt + outs[1].token_ids]))[0], -1)
    for i, (t, rec) in enumerate(zip(outs[1].token_ids, outs[1].logprobs, strict=True)):
        assert rec.logprob == pytest.approx(float(lp[len(prompt) - 1 + i, t]), abs=1e-4)
    # the same prompt under another adapter is no prefix-cache hit; under the same one it is
    (again2,) = eng.generate([prompt], p, adapters=[2])
    assert again2.usage.prompt_cache_hit_tokens == 16 and again2.token_ids == refs[1]
    if spec:
        assert eng.counters["draft_tokens"] > 0
    eng2 = Engine(served, None, EngineConfig(block_size=8, cache_memory=1 << 20))
    eng2.generate([prompt], p, adapters=[1])
    (other,) = eng2.generate([prompt], p, adapters=[2])
    assert other.usage.prompt_cache_hit_tokens == 0 and other.token_ids == refs[1]


def test_expert_adapters_in_mixed_batches_equal_each_adapters_model(tmp_path) -> None:
    """Adapters on the routed experts (finetune's default targets include them) served by name: rows on an
    experts-only adapter, on one with every default target, and on the base decode in one batch, each as its
    own LoRA model; at two rows per batch and at more tokens than experts (the grouped path)."""
    base = build_model(ModelConfig(**SERVE_TINY), seed=4).eval()
    ex = lora_model(base, tmp_path, "experts", 3, targets=("mlp.experts",))
    every = lora_model(base, tmp_path, "every", 5, targets=DENSE + ("mlp.experts",))
    served = copy.deepcopy(base)
    attach_adapters(served, [("experts", tmp_path / "experts"), ("every", tmp_path / "every")])
    assert type(served.model.layers[1].mlp.experts).__name__ == "MultiLoraExperts"
    eng = Engine(served, None, EngineConfig(block_size=8, cache_memory=1 << 20))
    prompt = torch.randint(0, 96, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = eng.generate([prompt, prompt, prompt, prompt[:7]], p, adapters=[1, 2, 0, 1])
    refs = [greedy(ex, prompt, 6), greedy(every, prompt, 6), greedy(base, prompt, 6), greedy(ex, prompt[:7], 6)]
    assert [o.token_ids for o in outs] == refs
    assert refs[0] != refs[2] and refs[1] != refs[2]  # the expert adapters do change the output
    (alone,) = Engine(served, None, EngineConfig(block_size=8, cache_memory=1 << 20)).generate([prompt], p, adapters=[1])
    assert alone.token_ids == refs[0]


def test_server_serves_adapters_by_model_name(tmp_path) -> None:
    """/v1/models lists the base and the adapters; a request's model picks one; concurrent requests for both
    (in the same batches) answer what each model gives alone; an unknown model is a 404."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    from frugallm.model.hf import save_pretrained
    from frugallm.serve.cli import _adapters
    from frugallm.serve.loading import load_for_serving
    from test_serve_server import TINY, LiveServer, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    save_pretrained(build_model(ModelConfig(**TINY), seed=3), tmp_path / "base", extra_files={"tokenizer.json": tok})
    model, codec = load_for_serving(tmp_path / "base")
    reference = lora_model(copy.deepcopy(model), tmp_path, "support", 5)
    base_ref = copy.deepcopy(model)
    assert _adapters(["support=" + str(tmp_path / "support")]) == [("support", str(tmp_path / "support"))]
    with pytest.raises(Exception, match="NAME=PATH"):
        _adapters(["nopath"])
    attach_adapters(model, [("support", tmp_path / "support")])
    srv = LiveServer(Engine(model, codec, EngineConfig(block_size=8, cache_memory=4 << 20)), name="tiny")
    try:
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["tiny", "support"]
        prompt = codec.encode("a budget is a plan for")

        def ask(name: str) -> list[int]:
            r = srv.client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                              extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            assert r.model == name
            return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, ["support", "tiny", "support", "tiny"]))
        want_a, want_b = greedy(reference, prompt, 6), greedy(base_ref, prompt, 6)
        assert want_a != want_b
        assert got == [want_a, want_b, want_a, want_b]
        with pytest.raises(openai.NotFoundError):
            srv.client.completions.create(model="other", prompt="x", max_tokens=1)
    finally:
        srv.close()


def test_attaching_adapters_holds_no_second_copy_of_the_base(tmp_path, monkeypatch) -> None:
    """The scratch model an adapter is loaded onto shares every base tensor with the served model (no weight
    is copied while it loads), and the served model's parameters keep their tensors and flags."""
    import frugallm.tune.adapter as adapter_mod

    base = build_model(ModelConfig(**SERVE_TINY), seed=4).eval()
    lora_model(base, tmp_path, "one", 1, targets=DENSE + ("mlp.experts",))
    lora_model(base, tmp_path, "two", 2)
    served = copy.deepcopy(base)
    served.model.layers[0].self_attn.o_proj.weight.requires_grad_(True)  # a flag apply_lora would clear
    before = {n: (p.data_ptr(), p.requires_grad) for n, p in served.named_parameters()}
    ptrs = {p.data_ptr() for p in served.parameters()}
    seen: list[int] = []
    real = adapter_mod.load_adapter

    def spy(scratch, directory):
        tensors = list(scratch.parameters())
        seen.append(len(tensors))
        assert tensors and all(t.data_ptr() in ptrs for t in tensors)
        return real(scratch, directory)

    monkeypatch.setattr(adapter_mod, "load_adapter", spy)
    attach_adapters(served, [("one", tmp_path / "one"), ("two", tmp_path / "two")])
    assert len(seen) == 2
    after = {n.replace(".base.", "."): (p.data_ptr(), p.requires_grad) for n, p in served.named_parameters()}
    assert all(after[n] == v for n, v in before.items())
