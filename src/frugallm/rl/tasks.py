"""Verifiable tasks for ``frugallm rl``: prompts, a split into training and held-out prompts, and a reward.

Built-in tasks run offline and are generated deterministically from their seed:
    arithmetic  "What is 17 + 25?" with +, - (operands 0..99) and * (0..12); the answer is the integer after
                the last ``Answer:``. Reward 1 for the right integer, ``FORMAT_REWARD`` for a well-formed but
                wrong answer (R1's format reward, section 2.2.2), 0 otherwise.
    countdown   reach a target from three or four numbers with + - * / (each number at most once); the answer
                is an expression after ``Answer:``, evaluated by walking its syntax tree (no ``eval``). Reward
                1 when it equals the target, ``FORMAT_REWARD`` when it parses but misses.
    python      write a small function from a description; reward 1 when the given asserts pass, run in the
                sandbox (``rl.sandbox``) with a random token printed after the asserts, so code that exits
                early (``sys.exit(0)`` before the asserts) earns nothing; ``FORMAT_REWARD`` when the function
                is defined but fails.
User tasks: a ``.jsonl`` of rows with ``prompt`` (text) or ``messages`` (a chat prefix) and whatever fields
the reward needs, and ``--reward module:function`` (``module`` importable or a path to a ``.py`` file): a
callable ``(row, completion) -> float``, run in a limited subprocess (``rl.user_reward``).

A sample is "correct" when its reward is at least 1; held-out accuracy is the share of correct greedy answers.
Held-out prompts: those whose hash falls in the held-out bucket, at most ``heldout`` of them.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import operator
import random
import re
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError, DataError

FORMAT_REWARD = 0.1
BUILTIN_TASKS = ("arithmetic", "countdown", "python")
ANSWER = re.compile(r"Answer:\s*([^\n]*)")


@dataclass
class Task:
    name: str
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    score: Callable[[list[dict[str, Any]], list[str]], tuple[list[float], Counter]]  # rows, completions
    system: str | None = None
    stats: Counter = field(default_factory=Counter)  # outcomes counted over the run (sandbox statuses, errors)

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if "messages" in row:
            return list(row["messages"])
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": row["prompt"]}]

    def rewards(self, rows: list[dict[str, Any]], completions: list[str]) -> list[float]:
        values, counts = self.score(rows, completions)
        self.stats.update(counts)
        return values


def split(rows: list[dict[str, Any]], heldout: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Held-out rows by hash of their prompt (stable across runs and machines), at most ``heldout``."""
    def h(row: dict[str, Any]) -> int:
        key = json.dumps(row.get("prompt", row.get("messages")), sort_keys=True)
        return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "big")

    ranked = sorted(rows, key=h)
    n = min(heldout, max(1, len(rows) // 10)) if len(rows) > 1 else 0
    held = {id(r) for r in ranked[:n]}
    return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]


def answer_text(completion: str) -> str | None:
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


# ----- arithmetic -----------------------------------------------------------------------------------------
def arithmetic_rows() -> list[dict[str, Any]]:
    rows = []
    for op, hi in (("+", 99), ("-", 99), ("*", 12)):
        fn = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op]
        for a, b in itertools.product(range(hi + 1), repeat=2):
            rows.append({"prompt": f"What is {a} {op} {b}?", "a": a, "b": b, "op": op, "answer": fn(a, b)})
    return rows


def arithmetic_solution(row: dict[str, Any]) -> str:
    """The formatted answer a supervised warm-up trains on."""
    return f"{row['a']} {row['op']} {row['b']} = {row['answer']}\nAnswer: {row['answer']}"


def _score_arithmetic(rows: list[dict[str, Any]], completions: list[str]) -> tuple[list[float], Counter]:
    out, counts = [], Counter()
    for row, text in zip(rows, completions, strict=True):
        got = answer_text(text)
        if got is None or not re.fullmatch(r"-?\d+", got):
            out.append(0.0)
            counts["unformatted"] += 1
        elif int(got) == row["answer"]:
            out.append(1.0)
        else:
            out.append(FORMAT_REWARD)
    return out, counts


# ----- countdown ------------------------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_expression(text: str, numbers: list[int]) -> float | None:
    """The value of an arithmetic expression over integers that uses each of ``numbers`` at most as often as
    given, or None when it is not one (a syntax error, another operator or name, a number not offered)."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return None
    left = Counter(numbers)

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and b == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if left[node.value] <= 0:
                raise ValueError("number not offered")
            left[node.value] -= 1
            return node.value
        raise ValueError("not allowed")

    try:
        return float(walk(tree.body))
    except (ValueError, OverflowError, RecursionError):
        return None


def countdown_rows(n: int = 4000, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        k = rng.choice((3, 4))
        nums = [rng.randint(1, 12) for _ in range(k)]
        expr = str(nums[0])
        for x in nums[1:]:
            expr = f"({expr} {rng.choice('+-*')} {x})"
        target = int(evaluate_expression(expr, nums))  # type: ignore[arg-type]
        key = (tuple(nums), target)
        if target <= 0 or key in seen:
            continue
        seen.add(key)
        listed = ", ".join(map(str, nums))
        rows.append({"prompt": f"Using the numbers {listed}, each at most once, and + - * /, make {target}.",
                     "numbers": nums, "target": target, "solution": expr})
    return rows


def _score_countdown(rows: list[dict[str, Any]], completions: list[str]) -> tuple[list[float], Counter]:
    out, counts = [], Counter()
    for row, text in zip(rows, completions, strict=True):
        got = answer_text(text)
        value = evaluate_expression(got, row["numbers"]) if got else None
        if value is None:
            out.append(0.0)
            counts["unformatted"] += 1
        else:
            out.append(1.0 if abs(value - row["target"]) < 1e-9 else FORMAT_REWARD)
    return out, counts


# ----- python function synthesis --------------------------------------------------------------------------
# (description with {k}, function name, reference as a lambda of k, inputs)
_PY_PROBLEMS: list[tuple[str, str, Callable[[int], Callable[..., Any]], list[tuple[Any, ...]]]] = [
    ("returns x plus {k}", "add_k", lambda k: lambda x: x + k, [(0,), (5,), (-3,), (100,)]),
    ("returns x times {k}", "times_k", lambda k: lambda x: x * k, [(0,), (2,), (-7,), (11,)]),
    ("returns True when the integer x is divisible by {k}", "divisible", lambda k: lambda x: x % k == 0,
     [(0,), (1,), (12,), (35,), (60,)]),
    ("returns the list xs with {k} added to every element", "shift_all", lambda k: lambda xs: [v + k for v in xs],
     [([],), ([1, 2],), ([-5, 0, 5],)]),
    ("returns how many times {k} occurs in the list xs", "count_k", lambda k: lambda xs: xs.count(k),
     [([],), ([1, 2, 3],), ([3, 3, 7, 3],), ([k_ for k_ in range(10)],)]),
    ("returns the string s repeated {k} times", "repeat", lambda k: lambda s: s * k, [("",), ("ab",), ("x",)]),
    ("returns the sum of the integers from 1 to n, plus {k}", "sum_to", lambda k: lambda n: n * (n + 1) // 2 + k,
     [(0,), (1,), (10,), (25,)]),
    ("returns the largest element of the non-empty list xs, or {k} if {k} is larger",
     "max_or_k", lambda k: lambda xs: max(max(xs), k), [([1],), ([50, 2],), ([-4, -9],)]),
]


def python_rows(ks: range = range(1, 41)) -> list[dict[str, Any]]:
    rows = []
    for desc, name, ref, inputs in _PY_PROBLEMS:
        for k in ks:
            f = ref(k)
            tests = [f"assert {name}({', '.join(map(repr, args))}) == {f(*args)!r}" for args in inputs]
            rows.append({"prompt": f"Write a Python function `{name}` that {desc.format(k=k)}.", "name": name,
                         "tests": tests})
    return rows


CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)


def extract_code(completion: str) -> str:
    blocks = CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def _score_python(limits: Any) -> Callable[[list[dict[str, Any]], list[str]], tuple[list[float], Counter]]:
    from frugallm.rl.sandbox import run_many

    def score(rows: list[dict[str, Any]], completions: list[str]) -> tuple[list[float], Counter]:
        nonce = secrets.token_hex(8)
        codes = [extract_code(c) + "\n\n" + "\n".join(r["tests"]) + f"\nprint({nonce!r})\n"
                 for r, c in zip(rows, completions, strict=True)]
        results = run_many(codes, limits)
        out, counts = [], Counter()
        for row, code, res in zip(rows, completions, results, strict=True):
            counts[f"sandbox_{res.status}"] += 1
            if res.ok and nonce in res.stdout:
                out.append(1.0)
            else:
                out.append(FORMAT_REWARD if f"def {row['name']}(" in code else 0.0)
        return out, counts

    return score


def warmup_rows(task: Task, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` chat rows answering training prompts with their formatted solution (held-out prompts are
    never among them)."""
    if task.name == "arithmetic":
        solve = arithmetic_solution
    elif task.name == "countdown":
        def solve(row: dict[str, Any]) -> str:
            return f"Answer: {row['solution']}"
    else:
        raise ConfigError(f"--write-warmup: task {task.name!r} has no built-in solutions (arithmetic, countdown)")
    rows = random.Random(0).sample(task.train, min(n, len(task.train)))
    return [{"messages": task.messages(r) + [{"role": "assistant", "content": solve(r)}]} for r in rows]


# ----- building a task ------------------------------------------------------------------------------------
def build_task(name: str, *, reward: str | None = None, heldout: int = 64, seed: int = 0,
               sandbox: Any = None) -> Task:
    """A built-in task by name, or a user task from a ``.jsonl`` path and a ``module:function`` reward."""
    if name == "arithmetic":
        train, held = split(arithmetic_rows(), heldout, seed)
        return Task(name, train, held, _score_arithmetic,
                    system="Answer with the integer after 'Answer:'.")
    if name == "countdown":
        train, held = split(countdown_rows(seed=seed), heldout, seed)
        return Task(name, train, held, _score_countdown,
                    system="Answer with one expression after 'Answer:'.")
    if name == "python":
        from frugallm.rl.sandbox import SandboxLimits

        train, held = split(python_rows(), heldout, seed)
        return Task(name, train, held, _score_python(sandbox or SandboxLimits()),
                    system="Answer with the function in a ```python code block.")
    if not name.endswith(".jsonl"):
        raise ConfigError(f"--task {name!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a .jsonl file")
    if reward is None:
        raise ConfigError(f"--task {name}: a user task needs --reward module:function")
    from frugallm.rl.user_reward import UserReward

    rows = read_prompt_rows(Path(name))
    fn = UserReward(reward, sandbox)
    train, held = split(rows, heldout, seed)
    return Task(Path(name).stem, train, held, fn.score)


def read_prompt_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"--task {path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
            ok = isinstance(row, dict) and (isinstance(row.get("prompt"), str) and row["prompt"].strip()
                                            or isinstance(row.get("messages"), list) and row["messages"])
            if not ok:
                raise DataError(f"{path}:{i}: a task row needs a non-empty 'prompt' string or 'messages' list")
            rows.append(row)
    if len(rows) < 2:
        raise DataError(f"{path}: a task needs at least 2 prompt rows, found {len(rows)}")
    return rows


__all__ = ["BUILTIN_TASKS", "FORMAT_REWARD", "Task", "answer_text", "arithmetic_rows", "arithmetic_solution",
           "build_task", "countdown_rows", "warmup_rows", "evaluate_expression", "extract_code", "python_rows", "split"]
