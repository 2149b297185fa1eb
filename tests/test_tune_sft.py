"""SFT data: row checks with counted reasons, truncate vs drop, the hash split, packing against padding, and
the built-in stdlib chat set."""

from __future__ import annotations

import json

import pytest
import torch

from frugallm.data.chat import ChatTemplate
from frugallm.data.tokenizer import train_tokenizer
from frugallm.errors import ConfigError
from frugallm.tune.sft import IGNORE, REASONS, SFTConfig, load_sft, pack, stdlib_chat_rows

EOS = "<|endoftext|>"


def chat(q: str, a: str, *more: str) -> dict:
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for i, t in enumerate(more):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs}


GOOD = [chat(f"question {i}?", f"answer number {i}.", f"follow up {i}", f"second answer {i}") for i in range(30)]
GOOD += [{"prompt": f"Q{i}:", "completion": f" done {i}"} for i in range(10)]
GOOD += [{"text": f"plain text document {i} about latent caches"} for i in range(10)]
BAD = {  # one line per reason that the file itself can cause
    "not_json": '{"messages": [',
    "not_object": "[1, 2]",
    "empty_row": "",
    "no_known_field": json.dumps({"question": "x"}),
    "missing_role": json.dumps({"messages": [{"content": "hi"}]}),
    "unknown_role": json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
    "non_string_content": json.dumps({"messages": [{"role": "user", "content": 3}]}),
    "empty_assistant": json.dumps(chat("hi", "  ")),
    "no_assistant": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    "too_long": json.dumps(chat("long " * 300, "short")),  # nothing trained within max_seq_len
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([json.dumps(r) for r in GOOD] * 3, 400)


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(eos_token=EOS)


def write(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_every_malformed_reason_is_counted(tmp_path, tok, template) -> None:
    f = write(tmp_path / "mixed.jsonl", GOOD[:5] + list(BAD.values()))
    data = load_sft([f], tok, template, SFTConfig(max_seq_len=128))
    rep = data.report
    assert rep.rows == 5 + len(BAD)
    assert dict(rep.malformed) == {reason: 1 for reason in BAD}
    assert set(BAD) <= set(REASONS)
    assert rep.train_rows + rep.val_rows == 5
    assert f"{f}:2" not in str(rep.examples) and f"{f}:6" in rep.examples["not_json"][0]  # row 6 is the bad one
    out = json.loads(rep.write(tmp_path / "report.json").read_text())
    assert out["malformed"]["not_json"] == 1 and "refused not_json: 1" in rep.format()


def test_template_problems_are_counted_not_raised(tmp_path, tok) -> None:
    strips = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    f = write(tmp_path / "a.jsonl", GOOD[:3] + [{"text": "x y"}])
    rep = load_sft([f], tok, ChatTemplate(strips), SFTConfig(max_seq_len=128)).report
    assert rep.malformed == {"template_not_prefix": 3, "no_eos_token": 1}


def test_masks_and_kinds(tmp_path, tok, template) -> None:
    f = write(tmp_path / "good.jsonl", GOOD)
    data = load_sft([f], tok, template, SFTConfig(max_seq_len=128, val_fraction=0.0))
    assert data.report.kinds == {"messages": 30, "completion": 10, "text": 10} and not data.val
    eos = tok.token_to_id(EOS)
    for ex in data.train:
        assert len(ex.ids) == len(ex.mask) and ex.ids[-1] == eos and ex.mask[-1]  # every row ends trained on EOS
    conv, comp, text = data.train[0], data.train[30], data.train[40]
    assert tok.decode([i for i, m in zip(conv.ids, conv.mask, strict=True) if m], skip_special_tokens=False) == (
        f"answer number 0.{EOS}second answer 0{EOS}")
    assert tok.decode([i for i, m in zip(comp.ids, comp.mask, strict=True) if m],
                      skip_special_tokens=False) == f" done 0{EOS}"
    assert all(text.mask)
    last = load_sft([f], tok, template, SFTConfig(max_seq_len=128, val_fraction=0.0, train_on="last")).train[0]
    assert last.ids == conv.ids and sum(last.mask) < sum(conv.mask)


def test_truncate_or_drop(tmp_path, tok, template) -> None:
    long_row = chat("q", "the answer " * 100)
    f = write(tmp_path / "long.jsonl", [long_row, GOOD[0]])
    cut = load_sft([f], tok, template, SFTConfig(max_seq_len=64, val_fraction=0.0))
    assert cut.report.truncated == 1 and not cut.report.malformed
    whole = load_sft([f], tok, template, SFTConfig(max_seq_len=4096, val_fraction=0.0)).train[0]
    assert cut.train[0].ids == whole.ids[:64] and cut.train[0].mask == whole.mask[:64]  # mask cut with the ids
    dropped = load_sft([f], tok, template, SFTConfig(max_seq_len=64, overflow="drop", val_fraction=0.0))
    assert dropped.report.malformed == {"too_long": 1} and len(dropped.train) == 1
    with pytest.raises(ConfigError, match="overflow"):
        SFTConfig(overflow="wrap")  # type: ignore[arg-type]


def test_split_is_by_hash_and_order_free(tmp_path, tok, template) -> None:
    cfg = SFTConfig(max_seq_len=128, val_fraction=0.3)
    a = load_sft([write(tmp_path / "a.jsonl", GOOD)], tok, template, cfg)
    b = load_sft([write(tmp_path / "b.jsonl", GOOD[::-1])], tok, template, cfg)
    val_a = sorted(tuple(e.ids) for e in a.val)
    assert val_a == sorted(tuple(e.ids) for e in b.val)
    assert 0 < len(a.val) < len(GOOD)
    grouped = [{**r, "group": "same"} for r in GOOD[:20]]
    g = load_sft([write(tmp_path / "g.jsonl", grouped)], tok, template, cfg)
    assert {len(g.train), len(g.val)} == {0, 20}  # one group, one side


def test_packing_contract(tmp_path, tok, template) -> None:
    data = load_sft([write(tmp_path / "good.jsonl", GOOD)], tok, template, SFTConfig(max_seq_len=96, val_fraction=0.0))
    exs = data.train
    packed, padded = pack(exs, 96, pad_id=1), pack(exs, 96, pad_id=1, packed=False)
    assert padded.input_ids.shape == (len(exs), 96) and packed.input_ids.shape[0] < len(exs)
    assert packed.efficiency > padded.efficiency
    assert data.report.packing["packed_sequences"] == packed.input_ids.shape[0]
    # the same trained (input, target) pairs, packed or padded
    def pairs(b) -> list:
        m = b.labels != IGNORE
        return sorted(zip(b.input_ids[m].tolist(), b.labels[m].tolist(), b.position_ids[m].tolist(), strict=True))
    assert pairs(packed) == pairs(padded)
    assert (packed.labels != IGNORE).sum().item() == data.report.trained_tokens
    # no label crosses a boundary: a target is the next input within the same segment
    seg, pos, ids, lab = packed.segment_ids, packed.position_ids, packed.input_ids, packed.labels
    has = lab[:, :-1] != IGNORE
    assert torch.equal(lab[:, :-1][has], ids[:, 1:][has])
    assert bool((seg[:, 1:][has] == seg[:, :-1][has]).all()) and bool((seg[:, :-1][has] != 0).all())
    assert bool((lab[:, -1][seg[:, -1] != 0] == IGNORE).all())
    # positions restart at 0 per segment and count up; padding is segment 0 with the pad id
    for r in range(seg.shape[0]):
        for s in seg[r].unique().tolist():
            where = (seg[r] == s).nonzero().flatten()
            if s == 0:
                assert bool((ids[r, where] == 1).all()) and bool((lab[r, where] == IGNORE).all())
                continue
            assert where.tolist() == list(range(where[0].item(), where[-1].item() + 1))
            assert pos[r, where].tolist() == list(range(len(where)))
    # each segment holds one example exactly
    rows = [ids[r, seg[r] == s].tolist() for r in range(seg.shape[0]) for s in seg[r].unique().tolist() if s]
    assert sorted(rows) == sorted(e.ids for e in exs)


def test_stdlib_chat_set(tmp_path, tok, template) -> None:
    rows = stdlib_chat_rows(60)
    assert rows == stdlib_chat_rows(60) and len(rows) == 60
    for r in rows:
        user, answer = r["messages"]
        assert "def " in user["content"] and ("\"\"\"" in user["content"] or "'''" in user["content"])
        assert answer["content"].strip() and r["group"]
    f = write(tmp_path / "std.jsonl", rows)
    data = load_sft([f], tok, template, SFTConfig(max_seq_len=4096, val_fraction=0.3))
    assert data.report.rows == 60 and not data.report.malformed
    modules_val = {rows[int(e.where.rsplit(":", 1)[1]) - 1]["group"] for e in data.val}
    modules_train = {rows[int(e.where.rsplit(":", 1)[1]) - 1]["group"] for e in data.train}
    assert modules_val and modules_train and not modules_val & modules_train  # split by module
