"""A user's reward ``module:function`` run in a limited subprocess, never in the trainer's process.

``module`` is a dotted name importable from the working directory or a path to a ``.py`` file; ``function``
a callable ``(row: dict, completion: str) -> float``. Each batch of (row, completion) pairs goes to a fresh
``python -I`` child as JSON and comes back as JSON: a reward that crashes, hangs, allocates without bound or
returns something that is not a finite number gives 0 for that sample (or the whole batch, on a timeout),
counted in the metrics as ``reward_error`` / ``reward_timeout``; the trainer goes on. The child has the limits
of ``rl.sandbox`` (address space, CPU time, file size, a temporary working directory, an empty environment)
but not its audit hook: a reward may legitimately run tools of its own.

The spec is checked once when the task is built (the module imports, the name exists, it is callable), so a
typo fails in a second with the reason, before any model is loaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError

_CHILD = r'''
import importlib, importlib.util, json, math, os, resource, sys
spec, limits = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name, value in (("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_CPU", limits["cpu_s"]),
                    ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_CORE", 0)):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
mod_name, fn_name = spec["module"], spec["function"]
try:
    if mod_name.endswith(".py"):
        s = importlib.util.spec_from_file_location("frugallm_user_reward", mod_name)
        module = importlib.util.module_from_spec(s)
        sys.path.insert(0, os.path.dirname(mod_name))
        s.loader.exec_module(module)
    else:
        sys.path.insert(0, spec["cwd"])
        module = importlib.import_module(mod_name)
except BaseException as e:
    print(json.dumps({"error": f"cannot import {mod_name}: {type(e).__name__}: {e}"}))
    sys.exit(0)
fn = getattr(module, fn_name, None)
if fn is None or not callable(fn):
    print(json.dumps({"error": f"{mod_name} has no callable {fn_name!r}"}))
    sys.exit(0)
pairs = json.load(sys.stdin)
out = []
for row, completion in pairs:
    try:
        v = float(fn(row, completion))
        out.append(v if math.isfinite(v) else None)
    except BaseException:
        out.append(None)
print(json.dumps({"rewards": out}))
'''


class UserReward:
    def __init__(self, spec: str, limits: Any = None, cwd: str | Path | None = None) -> None:
        from frugallm.rl.sandbox import SandboxLimits

        if not isinstance(spec, str) or spec.count(":") < 1:
            raise ConfigError(f"--reward {spec!r}: expected module:function (a dotted module or a .py path)")
        module, function = spec.rsplit(":", 1)
        if not module or not function.isidentifier():
            raise ConfigError(f"--reward {spec!r}: expected module:function, with a valid function name")
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise ConfigError(f"--reward {spec!r}: no such file {module}")
            module = str(Path(module).resolve())
        self.spec = spec
        self.limits = limits or SandboxLimits(timeout_s=30.0)
        self.payload = {"module": module, "function": function, "cwd": str(Path(cwd or ".").resolve())}
        reply = self._call([])
        if "error" in reply:
            raise ConfigError(f"--reward {spec!r}: {reply['error']}")

    def _call(self, pairs: list[Any]) -> dict[str, Any]:
        lim = self.limits
        settings = {"memory_bytes": lim.memory_bytes, "cpu_s": max(1, int(lim.timeout_s) + 1),
                    "file_bytes": lim.file_bytes}
        with tempfile.TemporaryDirectory(prefix="frugallm-reward-") as tmp:
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
            try:
                done = subprocess.run([sys.executable, "-I", "-c", _CHILD, json.dumps(self.payload),
                                       json.dumps(settings)], input=json.dumps(pairs), capture_output=True,
                                      text=True, timeout=lim.timeout_s, cwd=tmp, env=env)
            except subprocess.TimeoutExpired:
                return {"timeout": True}
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            return {"crash": tail[0]}

    def score(self, rows: list[dict[str, Any]], completions: list[str]) -> tuple[list[float], Counter]:
        reply = self._call([[r, c] for r, c in zip(rows, completions, strict=True)])
        counts: Counter = Counter()
        values = reply.get("rewards")
        if not isinstance(values, list) or len(values) != len(rows):
            counts["reward_timeout" if reply.get("timeout") else "reward_error"] += len(rows)
            return [0.0] * len(rows), counts
        out = []
        for v in values:
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
            else:
                out.append(0.0)
                counts["reward_error"] += 1
        return out, counts


__all__ = ["UserReward"]
