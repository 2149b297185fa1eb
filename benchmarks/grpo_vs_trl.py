"""Seconds per GRPO step: ``frugallm rl`` (``rl.trainer.GRPOTrainer``: rollouts from the serving engine over
the trained modules, LoRA) against trl's ``GRPOTrainer`` on transformers' ``DeepseekV3ForCausalLM`` with a
peft LoRA, same weights, same G, prompts per step, completion length, LoRA rank and targets, learning rate,
loss (token-mean, DAPO's, which is trl's default ``loss_type``), beta 0, one optimisation pass per batch,
in one process. Prints a table and a final RESULT line.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--preset tiny] [--group 8] [--prompts 4] [--new-tokens 32]
        [--steps 6] [--rank 8] [--threads 2]

The weights are a random init of ``--preset`` (end of sequence is then about as rare as any token, so both
sides generate close to ``--new-tokens`` each; the mean completion length of each side is printed). The
reward is graded (distinct words in the completion), so every group carries signal on both sides; ours runs
it in its limited subprocess, trl in-process. The first step of each side is excluded (warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_vs_hf import hf_model  # noqa: E402

from frugallm.config import preset  # noqa: E402
from frugallm.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.model.hf import save_pretrained  # noqa: E402

TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EOS = "<|endoftext|>"
WORDS = "cache latent expert router token block scale tile group reward sample policy".split()


def reward_value(completion: str) -> float:
    return len(set(completion.split())) / 10


def setup(root: Path, cfg_name: str, n_prompts: int):
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(400)]
    tok = train_tokenizer(texts, 2048)
    save_tokenizer(tok, root / "tokenizer.json")
    # the model's vocabulary is the tokenizer's: every sampled id decodes to text the reward sees
    cfg = preset(cfg_name).replace(vocab_size=tok.get_vocab_size())
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    model = build_model(cfg, seed=0)
    save_pretrained(model, root / "base", extra_files={"tokenizer.json": root / "tokenizer.json",
                                                       "tokenizer_config.json": root / "tokenizer_config.json"})
    prompts = [f"say {WORDS[i % len(WORDS)]} {i}" for i in range(n_prompts)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "reward_fn.py").write_text("def score(row, completion):\n"
                                       "    return len(set(completion.split())) / 10\n")
    return model


def run_ours(root: Path, args) -> tuple[list[float], float]:
    from frugallm.rl.trainer import GRPOTrainer, RLConfig, rl_train_defaults
    from frugallm.tune.finetune import FinetuneConfig

    ft = FinetuneConfig(base=str(root / "base"), lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                        lora_targets=TARGETS)
    rl = RLConfig(task=str(root / "prompts.jsonl"), reward=f"{root / 'reward_fn.py'}:score", group_size=args.group,
                  prompts_per_step=args.prompts, max_new_tokens=args.new_tokens, temperature=1.0, heldout=2)
    tcfg = rl_train_defaults("lora").replace(lr=1e-5, warmup_steps=0, max_steps=args.steps, time_budget_s=None,
                                             eval_every_s=1e9, checkpoint_every_s=1e9, precision="fp32",
                                             device="cpu", threads=args.threads)
    trainer = GRPOTrainer(ft, rl, tcfg, root / "ours", progress=False)
    trainer.run()
    recs = [json.loads(line) for line in (root / "ours" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward_mean" in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:], strict=False)]
    return times, statistics.mean(r["response_length"] for r in steps)


def run_trl(root: Path, ours_model, args) -> tuple[list[float], float]:
    import peft
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = hf_model(ours_model.config, ours_model)
    model.generation_config.eos_token_id = None
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), eos_token=EOS,
                                               pad_token=EOS)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.pad_token_id = tok.pad_token_id
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    def reward(completions, **_):
        return [reward_value(c) for c in completions]

    stamps: list[float] = []

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    cfg = GRPOConfig(output_dir=str(root / "trl"), num_generations=args.group,
                     per_device_train_batch_size=args.group * args.prompts, max_completion_length=args.new_tokens,
                     learning_rate=1e-5, max_steps=args.steps, use_cpu=True, report_to="none", logging_steps=1,
                     save_strategy="no", beta=0.0, temperature=1.0, bf16=False, seed=0,
                     generation_kwargs={"min_new_tokens": args.new_tokens})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          peft_config=lora, callbacks=[Stamp()])
    trainer.train()
    lengths = [float(r["completions/mean_length"]) for r in trainer.state.log_history if "completions/mean_length" in r]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], statistics.mean(lengths) if lengths else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = setup(root, args.preset, 64)
        ours, ours_len = run_ours(root, args)
        theirs, trl_len = run_trl(root, model, args)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{args.preset} (random weights), G={args.group}, {args.prompts} prompts/step, {args.new_tokens} new tokens, "
          f"LoRA r={args.rank} on MLA projections, fp32, {args.threads} threads; median of steps 2..{args.steps}")
    print(f"{'':28}{'s/step':>10}{'mean completion tokens':>26}")
    print(f"{'frugallm rl':28}{a:>10.2f}{ours_len:>26.1f}")
    print(f"{'trl GRPOTrainer':28}{b:>10.2f}{trl_len:>26.1f}")
    print(f"RESULT grpo_step_speedup={b / a:.2f} ours_s_per_step={a:.2f} trl_s_per_step={b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
