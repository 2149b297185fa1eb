"""Checkpoints: optimizer and RNG state round-trip through the safe readers, and a planted pickle that would
run code is refused by ``frugallm train --resume`` with one line and exit code 2, before it runs."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch

from frugallm import cli
from frugallm.errors import CheckpointError
from frugallm.model import build_model
from frugallm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from frugallm.train.config import TrainConfig
from frugallm.train.loop import Trainer
from frugallm.train.optim import build_optimizer
from shapes import MICRO


class _WritesAFile:
    """Unpickling this calls ``Path.write_text(marker, ...)``: what a hostile optimizer.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return pathlib.Path.write_text, (self.marker, "unpickled")


def _stepped(adam_moments: str):  # type: ignore[no-untyped-def]
    model = build_model(MICRO, seed=0)
    opt = build_optimizer(model, TrainConfig(adam_moments=adam_moments, precision="fp32"))
    tokens = torch.randint(0, MICRO.vocab_size, (2, 18), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        out = model(tokens, train=True)
        (out.loss + torch.stack(out.mtp_losses).sum() + out.balance_loss).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("adam_moments", ["fp32", "bf16"])
def test_optimizer_and_rng_state_round_trip(tmp_path: Path, adam_moments: str) -> None:
    model, opt = _stepped(adam_moments)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 2, model, opt, {"tokens": 0})
    after_save = torch.rand(4)
    torch.manual_seed(999)  # the load must put the generator back, whatever it is now
    model2, opt2 = _stepped(adam_moments)
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    opt2.state.clear()
    load_checkpoint(path, model2, opt2)
    assert torch.equal(torch.rand(4), after_save)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), name
        s, s2 = opt.state[p], opt2.state[p2]
        assert s.keys() == s2.keys() and s, name
        for k in s:
            assert s[k].dtype == s2[k].dtype and torch.equal(s[k], s2[k]), (name, k)
    if adam_moments == "bf16":
        assert opt2.state[next(model2.parameters())]["exp_avg"].dtype == torch.bfloat16
    assert json.loads((path / "state.json").read_text())["rng"].keys() >= {"torch_cpu"}  # JSON, no pickle


def test_a_damaged_state_names_its_file(tmp_path: Path) -> None:
    model, opt = _stepped("fp32")
    path = save_checkpoint(tmp_path, 2, model, opt, {})
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "rng": {"torch_cpu": "not base64!"}}))
    with pytest.raises(CheckpointError, match="state.json: unreadable RNG state"):
        load_checkpoint(path, model, opt)
    (path / "optimizer.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="optimizer.pt: unreadable"):
        load_checkpoint(path, model, opt)


@pytest.mark.parametrize("where", ["optimizer.pt", "rng", "dcp-metadata"])
def test_resume_refuses_a_planted_pickle_without_running_it(corpus_dir, tmp_path, capsys, where) -> None:
    run = tmp_path / "run"
    cfg = TrainConfig(data=[str(corpus_dir)], seq_len=16, batch_size=2, precision="fp32", time_budget_s=None,
                      max_steps=1, eval_every_s=1e9, checkpoint_every_s=1e9, eval_windows=1, val_fraction=0.05)
    Trainer(MICRO, cfg, run, progress=False).run()
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    marker = tmp_path / "marker"
    if where == "optimizer.pt":
        torch.save({"state": {0: _WritesAFile(marker)}, "param_groups": []}, ckpt / "optimizer.pt")
    elif where == "dcp-metadata":  # a sharded checkpoint's .metadata, which DCP reads with pickle.load
        import pickle

        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "format": "dcp"}))
        (ckpt / ".metadata").write_bytes(pickle.dumps(_WritesAFile(marker)))
    else:  # the RNG state of checkpoints written before it was JSON: base64 of a torch.save
        import base64
        import io

        buf = io.BytesIO()
        torch.save({"cpu": _WritesAFile(marker)}, buf)
        state = json.loads((ckpt / "state.json").read_text())
        state["rng"] = {"torch": base64.b64encode(buf.getvalue()).decode()}
        (ckpt / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    code = cli.main(["train", "--resume", str(run), "--max-steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert not marker.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    named = {"optimizer.pt": "optimizer.pt", "rng": "state.json", "dcp-metadata": ".metadata"}[where]
    assert lines[0].startswith("frugallm: error: ") and named in lines[0] and "refused" in lines[0], lines[0]
