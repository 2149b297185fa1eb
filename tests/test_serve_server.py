"""The OpenAI-compatible server on a free local port, exercised with the official ``openai`` client and raw
HTTP; loading run and Hugging Face directories; ``frugallm generate``."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from frugallm.config import ModelConfig  # noqa: E402
from frugallm.errors import CheckpointError  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.model.hf import save_pretrained  # noqa: E402
from frugallm.serve.engine import Engine, EngineConfig  # noqa: E402
from frugallm.serve.loading import Codec, load_for_serving  # noqa: E402
from frugallm.serve.server import create_app  # noqa: E402
from shapes import SERVE_TINY  # noqa: E402

TINY = {**SERVE_TINY, "vocab_size": 320, "max_position_embeddings": 128, "num_nextn_predict_layers": 1}
TEXTS = ["the cheapest token is the one served from the cache", "multi-head latent attention keeps a latent",
         "speculative decoding drafts with the MTP module", "a budget is a plan for money"] * 20
pytestmark = pytest.mark.usefixtures("one_thread")
PRICE = 3.6  # dollars per hour: one cent per compute-second, easy to check


def make_tokenizer(path: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run directory as the training loop writes it: model/ (HF format, tokenizer inside) and
    tokenizer.json."""
    root = tmp_path_factory.mktemp("runs") / "tiny-run"
    tok = make_tokenizer(root)
    model = build_model(ModelConfig(**TINY), seed=3)
    save_pretrained(model, root / "model", extra_files={"tokenizer.json": tok})
    return root


class LiveServer:
    def __init__(self, engine: Engine, name: str = "tiny") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.engine = engine
        app = create_app(engine, name, price_per_hour=PRICE)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(run_dir):
    model, codec = load_for_serving(run_dir)
    srv = LiveServer(Engine(model, codec, EngineConfig(block_size=8, cache_memory=4 << 20, max_batch=16)))
    yield srv
    srv.close()


# ----- loading ---------------------------------------------------------------------------------------------
def test_load_run_dir_and_hf_dir(run_dir, tmp_path) -> None:
    model, codec = load_for_serving(run_dir)
    assert model.config.num_nextn_predict_layers == 1
    assert codec.eos_ids == {codec.tokenizer.token_to_id("<|endoftext|>")}
    model2, _ = load_for_serving(run_dir / "model")  # the HF directory itself
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)
    with pytest.raises(CheckpointError, match="neither"):
        load_for_serving(tmp_path)
    assert "<|assistant|>" in codec.render_chat([{"role": "user", "content": "hi"}])


def test_chat_template_from_tokenizer_config(run_dir, tmp_path) -> None:
    d = tmp_path / "hf"
    make_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}"}))
    codec = Codec.from_dir(d)
    assert codec.render_chat([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    assert codec.chat_stops == ()


def test_generate_command(run_dir, capsys) -> None:
    from frugallm.cli import main

    args = ["generate", str(run_dir), "--prompt", "the cheapest", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.startswith("the cheapest") and "tokens/s" in first.err
    assert main(args + ["--no-speculative"]) == 0
    assert capsys.readouterr().out == first.out  # greedy, with or without MTP drafting
    assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


# ----- the API with the openai client ---------------------------------------------------------------------
def test_models_health_and_completion(live) -> None:
    assert [m.id for m in live.client.models.list().data] == ["tiny"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    r = live.client.completions.create(model="tiny", prompt="the cheapest token", max_tokens=8, temperature=0)
    assert isinstance(r.choices[0].text, str) and r.choices[0].finish_reason in ("length", "stop")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert extra["cost_usd"] == pytest.approx(extra["compute_seconds"] * PRICE / 3600, rel=1e-3, abs=1e-9)
    assert extra["cost_usd"] > 0
    again = live.client.completions.create(model="tiny", prompt="the cheapest token", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_chat_streaming_with_usage_matches_non_streaming(live) -> None:
    messages = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "what is a budget?"}]
    full = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant"
    chunks = list(live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    # the same conversation again: its prompt comes from the prefix cache
    assert chunks[-1].usage.model_extra["prompt_cache_hit_tokens"] > 0
    # completions stream too, ending in [DONE]
    with httpx.stream("POST", live.url + "/v1/completions", json={
            "model": "tiny", "prompt": "latent", "max_tokens": 5, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_shared_prefix_is_billed_as_cache_hits(live) -> None:
    system = {"role": "system", "content": " ".join(TEXTS[:2])}
    a = live.client.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                            messages=[system, {"role": "user", "content": "one"}])
    b = live.client.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                            messages=[system, {"role": "user", "content": "two"}])
    hit = b.usage.model_extra["prompt_cache_hit_tokens"]
    assert hit >= 24 and b.usage.prompt_tokens_details.cached_tokens == hit
    assert a.usage.model_extra["prompt_cache_miss_tokens"] >= b.usage.model_extra["prompt_cache_miss_tokens"]


def test_sixteen_concurrent_requests(live) -> None:
    def ask(i: int) -> str:
        r = live.client.chat.completions.create(model="tiny", max_tokens=10, temperature=0.7, seed=i,
                                                messages=[{"role": "user", "content": f"request {i}"}])
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(ask, range(16)))
    assert len(reasons) == 16 and all(r in ("stop", "length") for r in reasons)
    metrics = httpx.get(live.url + "/metrics").text
    for name in ("frugallm_requests_total", "frugallm_prompt_tokens_total", "frugallm_completion_tokens_total",
                 "frugallm_generation_tokens_per_second", "frugallm_prompt_cache_hit_rate",
                 "frugallm_speculative_acceptance_rate", "frugallm_queue_length", "frugallm_cost_dollars_total"):
        assert f"\n{name} " in metrics or f"\n{name}{{" in metrics, name
    assert live.engine.pool.used_blocks() == 0


BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "budget " * 200}, 400, "prompt"),  # longer than the context
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "budget " * 200}]},
     400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/nothing-here", {"model": "tiny"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_answers_openai_error_json(live, path, body, status, param) -> None:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(live.url + path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "type" in err
    if param is not None:
        assert err["param"] == param
    assert httpx.get(live.url + "/health").status_code == 200  # still serving


def test_openai_client_sees_the_errors(live) -> None:
    with pytest.raises(openai.NotFoundError):
        live.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        live.client.completions.create(model="tiny", prompt="budget " * 200)


# ----- overload and disconnects ----------------------------------------------------------------------------
def test_full_queue_answers_503_and_disconnect_frees_blocks(run_dir) -> None:
    model, codec = load_for_serving(run_dir)
    engine = Engine(model, codec, EngineConfig(block_size=8, cache_memory=4 << 20, max_batch=1, max_queue=1))
    step = engine.step

    def slow_step():  # a slower device, so the test controls the timing
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    srv = LiveServer(engine)
    try:
        body = {"model": "tiny", "prompt": "a budget", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # running, and holding the only batch slot
            assert engine.pool.used_blocks() > 0
            waiting = ThreadPoolExecutor(1).submit(srv.client.completions.create, model="tiny", prompt="queued",
                                                   max_tokens=3)
            deadline = time.time() + 10
            while engine.queue_length() < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_overloaded"
            with pytest.raises(openai.InternalServerError):
                srv.client.completions.create(model="tiny", prompt="x", max_tokens=2)
        # the stream's client went away: its sequence is aborted, the queued request runs and finishes
        assert waiting.result(timeout=30).choices[0].finish_reason in ("stop", "length")
        deadline = time.time() + 10
        while engine.has_work() or engine.pool.used_blocks():
            assert time.time() < deadline
            time.sleep(0.01)
        assert engine.counters["aborted"] == 1 and engine.pool.reserved == 0
        assert 'frugallm_http_requests_total{path="/v1/completions",status="503"} 2' in \
            httpx.get(srv.url + "/metrics").text
    finally:
        srv.close()


# ----- the ecosystem's requests: logprobs, echo, batched and token-id prompts, n, keys ------------------------
@pytest.fixture(scope="module")
def hf_logprobs(run_dir):
    """log-softmax of transformers' DeepseekV3ForCausalLM on the served weights (float32)."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()

    @torch.no_grad()
    def lp(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(theirs(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]

    return lp


def test_echo_logprobs_equal_transformers_and_contexts_hit_the_cache(live, hf_logprobs) -> None:
    """lm-evaluation-harness's scoring request: echo, max_tokens 1, logprobs 1, token-id prompts sharing a
    context. token_logprobs has prompt length + 1 entries, the first null; each equals transformers' within
    1e-4; the second choice's context comes from the prefix cache."""
    codec = live.engine.codec
    ctx = codec.encode("the cheapest token is the one served from the cache and a budget is a plan")
    conts = [codec.encode(" for money"), codec.encode(" with the MTP module")]
    for cont in conts:
        ids = ctx + cont
        r = live.client.completions.create(model="tiny", prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                           temperature=0, seed=1234)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and len(lp.tokens) == len(lp.text_offset) == len(ids) + 1
        ref = hf_logprobs(ids)
        for p in range(1, len(ids)):
            assert lp.token_logprobs[p] == pytest.approx(float(ref[p - 1, ids[p]]), abs=1e-4)
            assert max(lp.top_logprobs[p].values()) == pytest.approx(float(ref[p - 1].max()), abs=1e-4)
        assert r.choices[0].text.startswith(codec.decode(ids))
        assert lp.text_offset[1] == len(lp.tokens[0])
    assert r.usage.prompt_tokens_details.cached_tokens >= len(ctx) // 8 * 8 > 0
    r = live.client.completions.create(model="tiny", prompt=ctx + conts[0], max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].logprobs.top_logprobs[1] == {} and len(r.choices[0].logprobs.token_logprobs) == len(
        ctx + conts[0])


def test_generated_logprobs_chat_format_and_sampling_temperature(live, hf_logprobs) -> None:
    """Chat logprobs (token, logprob, bytes, top_logprobs) are log-softmax at temperature 1 even when
    sampling at 0.7, equal to transformers' on prompt + output."""
    codec = live.engine.codec
    msgs = [{"role": "user", "content": "a budget is"}]
    r = live.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0.7, seed=5,
                                            logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = codec.encode(codec.render_chat(msgs), add_special_tokens=False)
    assert len(content) >= 1 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    ref = hf_logprobs(prompt)[-1]  # [V] the first output token's distribution
    # the token ids whose text is the first output token's (the format carries text, not ids)
    same = [i for i in range(ref.shape[0]) if codec.tokenizer.decode([i], skip_special_tokens=False)
            == content[0].token]
    assert any(abs(content[0].logprob - float(ref[i])) < 1e-4 for i in same)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)


def test_batched_prompts_n_seed_stop_ids_and_stream_logprobs(live) -> None:
    codec = live.engine.codec
    strs = ["the cheapest", "multi-head latent", "a budget"]
    r = live.client.completions.create(model="tiny", prompt=strs, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for s, c in zip(strs, r.choices, strict=True):
        one = live.client.completions.create(model="tiny", prompt=s, max_tokens=5, temperature=0)
        assert one.choices[0].text == c.text
    ids = [codec.encode(s) for s in strs]
    r2 = live.client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in r2.choices] == [c.text for c in r.choices]
    a = live.client.completions.create(model="tiny", prompt="a budget", n=3, max_tokens=8, seed=11, temperature=1)
    b = live.client.completions.create(model="tiny", prompt="a budget", n=3, max_tokens=8, seed=11, temperature=1)
    assert [c.index for c in a.choices] == [0, 1, 2] and [c.text for c in a.choices] == [c.text for c in b.choices]
    g = live.client.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    toks = [int(t.removeprefix("token_id:")) for t in g.choices[0].logprobs.tokens]
    stop_at = toks[2]
    s = live.client.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0,
                                       extra_body={"stop_token_ids": [stop_at], "ignore_eos": True})
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].text == codec.decode(toks[: toks.index(stop_at)])
    chunks = list(live.client.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0,
                                                 logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(g.choices[0].logprobs.token_logprobs, abs=1e-6)


def test_tokenizer_routes_as_vllm(live) -> None:
    r = httpx.post(live.url + "/tokenize", json={"model": "tiny", "prompt": "a budget is a plan"}).json()
    assert r["tokens"] == live.engine.codec.encode("a budget is a plan") and r["count"] == len(r["tokens"])
    d = httpx.post(live.url + "/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json()
    assert d["prompt"] == "a budget is a plan"
    info = httpx.get(live.url + "/tokenizer_info").json()
    assert info["model_max_length"] == live.engine.max_model_len and info["eos_token"] == "<|endoftext|>"


LOGPROB_BAD = [
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, "/v1/completions", "logprobs"),
    ({"model": "tiny", "prompt": "x", "logprobs": True}, "/v1/completions", "logprobs"),
    ({"model": "tiny", "prompt": "x", "echo": True, "stream": True}, "/v1/completions", "echo"),
    ({"model": "tiny", "prompt": "x", "n": 9}, "/v1/completions", "n"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "/v1/completions", "max_tokens"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "/v1/completions", "suffix"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": ["a"]}, "/v1/completions", "stop_token_ids"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "/v1/chat/completions", "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "/v1/chat/completions", "top_logprobs"),
]


@pytest.mark.parametrize("body, path, param", LOGPROB_BAD, ids=[b[2] for b in LOGPROB_BAD])
def test_unsupported_or_out_of_range_answers_400_naming_the_parameter(live, body, path, param) -> None:
    r = httpx.post(live.url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_api_keys_guard_v1_not_health(run_dir, tmp_path, caplog) -> None:
    from frugallm.cli import build_parser
    from frugallm.serve.auth import is_loopback, load_keys, open_warning

    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nk-one\nk-two\n")
    keys = load_keys(["k-cli"], str(keys_file), env={"FRUGALLM_API_KEY": "k-env"})
    assert keys == ["k-cli", "k-one", "k-two", "k-env"]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert "without an API key" in open_warning("0.0.0.0", []) and open_warning("0.0.0.0", keys) is None
    assert open_warning("127.0.0.1", []) is None
    args = build_parser().parse_args(["serve", "d", "--api-key", "a", "--api-key", "b", "--api-key-file",
                                      str(keys_file), "--max-n", "4"])
    assert args.api_key == ["a", "b"] and args.max_n == 4
    model, codec = load_for_serving(run_dir)
    engine = Engine(model, codec, EngineConfig(block_size=8, cache_memory=1 << 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, "tiny", api_keys=keys)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for k in keys:
            assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {k}"}).status_code == 200
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=url + "/v1", api_key="k-two", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=1).choices[0].finish_reason
        assert not any(k in rec.getMessage() for rec in caplog.records for k in keys)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
