"""The one reader of model directories (``frugallm.rundir``), through serving's and training's entry points: a
run's final export, a run with only checkpoints (the newest, said so), an HF directory, and neither."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from frugallm.config import ModelConfig
from frugallm.data.tokenizer import save_tokenizer, train_tokenizer
from frugallm.errors import CheckpointError
from frugallm.model import build_model
from frugallm.model.hf import save_pretrained
from frugallm.rundir import find_model, load_model
from frugallm.serve.loading import load_for_serving
from frugallm.train.checkpoint import save_checkpoint
from frugallm.train.config import TrainConfig
from frugallm.train.runconfig import write_run_config
from shapes import SERVE_TINY

CFG = ModelConfig(**{**SERVE_TINY, "vocab_size": 320, "num_nextn_predict_layers": 1})


def checkpointed_run(root: Path, seeds: tuple[int, ...] = (1, 2)) -> list[torch.nn.Module]:
    """A run directory the training loop left without its final export: config.toml, tokenizer.json and one
    checkpoint per seed, at steps 10, 20, ..."""
    root.mkdir(parents=True)
    write_run_config(root / "config.toml", CFG, TrainConfig())
    save_tokenizer(train_tokenizer(["a run directory holds a model"] * 8, vocab_size=300), root / "tokenizer.json")
    models = []
    for step, seed in enumerate(seeds, start=1):
        model = build_model(CFG, seed=seed)
        save_checkpoint(root, 10 * step, model, torch.optim.SGD(model.parameters(), lr=0.1), {"tokens": 0})
        models.append(model)
    return models


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_only_checkpoints_loads_the_newest_and_says_so(tmp_path, caplog) -> None:
    root = tmp_path / "run"
    _, newest = checkpointed_run(root)
    torch.rand(8)  # this process's RNG moves on from the state the checkpoint saved
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="frugallm.rundir"):
        model, codec = load_for_serving(root)
    assert same_weights(model, newest) and not model.training
    assert "no final export" in caplog.text and "step_000020" in caplog.text
    assert torch.equal(torch.get_rng_state(), rng)  # the checkpoint's RNG state stays the run's
    assert codec.eos_ids == {0}  # tokenizer.json from the run's root
    assert same_weights(load_model(root)[0], newest)  # training's entry point reads it the same way


def test_a_final_export_wins_over_checkpoints(tmp_path) -> None:
    root = tmp_path / "run"
    checkpointed_run(root)
    exported = build_model(CFG, seed=3)
    save_pretrained(exported, root / "model", extra_files={"tokenizer.json": root / "tokenizer.json"})
    assert find_model(root).kind == "export"
    assert same_weights(load_for_serving(root)[0], exported)
    assert same_weights(load_model(root)[0], exported)
    model, source = load_model(root / "model")  # the export is itself an HF directory
    assert source.kind == "hf" and same_weights(model, exported)


def test_neither_a_run_nor_an_hf_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_for_serving(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a frugallm run directory"):
        load_for_serving(tmp_path)
    checkpointed_run(tmp_path / "early", seeds=())  # a run that has written no checkpoint yet
    with pytest.raises(CheckpointError, match="neither a final export"):
        load_model(tmp_path / "early")[0]
    root = tmp_path / "copied"
    checkpointed_run(root)
    (root / "config.toml").unlink()
    with pytest.raises(CheckpointError, match="no config.toml"):
        find_model(root)
