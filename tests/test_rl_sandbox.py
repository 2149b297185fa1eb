"""The sandbox that runs a completion's code, and the user reward's limited subprocess: each harmful program
ends with reward 0, within its limit, and harms nothing outside its directory."""

from __future__ import annotations

import time

import pytest

from frugallm.errors import ConfigError
from frugallm.rl.sandbox import SandboxLimits, run_many, run_python
from frugallm.rl.user_reward import UserReward

LIMITS = SandboxLimits(timeout_s=2.0)


def test_a_correct_program_passes_and_a_failing_one_fails():
    assert run_python("assert sum([1, 2]) == 3\nprint('done')", LIMITS).status == "ok"
    r = run_python("assert 1 == 2", LIMITS)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_an_infinite_loop_is_killed_at_the_limit():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass", LIMITS)
    assert r.status == "timeout" and time.perf_counter() - t0 < LIMITS.timeout_s + 2


def test_a_huge_allocation_fails_inside_the_child():
    r = run_python("x = bytearray(8 * 2**30)\nprint(len(x))", LIMITS)
    assert r.status == "memory" and not r.ok


def test_fork_and_subprocess_are_refused():
    assert run_python("import os\nos.fork()", LIMITS).status == "blocked"
    assert run_python("import subprocess\nsubprocess.run(['true'])", LIMITS).status == "blocked"
    assert run_python("import os\nos.system('true')", LIMITS).status == "blocked"


def test_no_write_outside_its_directory(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    r = run_python(f"open({str(target)!r}, 'w').write('gone')", LIMITS)
    assert r.status == "blocked" and target.read_text() == "keep"
    r = run_python(f"import os\nos.remove({str(target)!r})", LIMITS)
    assert r.status == "blocked" and target.exists()
    # a refused write that the code swallows still counts as blocked (never as ok)
    r = run_python(f"try:\n    open({str(target)!r}, 'a')\nexcept PermissionError:\n    pass", LIMITS)
    assert r.status == "blocked" and target.read_text() == "keep"
    # its own directory is writable
    assert run_python("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'",
                      LIMITS).status == "ok"


def test_no_network():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", LIMITS)
    assert r.status == "blocked"


def test_timeouts_run_side_by_side():
    t0 = time.perf_counter()
    results = run_many(["import time\ntime.sleep(30)"] * 4, SandboxLimits(timeout_s=1.0), workers=4)
    assert [r.status for r in results] == ["timeout"] * 4
    assert time.perf_counter() - t0 < 3.5  # about one limit, not four


# ----- the user's reward -----------------------------------------------------------------------------------
def test_user_reward_from_a_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(row, completion):\n"
                 "    if completion == 'boom':\n        raise RuntimeError('bad')\n"
                 "    if completion == 'nan':\n        return float('nan')\n"
                 "    return float(completion == row['answer'])\n")
    reward = UserReward(f"{f}:score")
    values, counts = reward.score([{"answer": "4"}] * 4, ["4", "5", "boom", "nan"])
    assert values == [1.0, 0.0, 0.0, 0.0] and counts["reward_error"] == 2


def test_user_reward_that_hangs_gives_zero_and_is_counted(tmp_path):
    f = tmp_path / "slow.py"
    f.write_text("import time\ndef score(row, completion):\n    time.sleep(60)\n    return 1.0\n")
    reward = UserReward(f"{f}:score", SandboxLimits(timeout_s=1.5))
    values, counts = reward.score([{}, {}], ["a", "b"])
    assert values == [0.0, 0.0] and counts["reward_timeout"] == 2


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "module:function"),
    ("/nonexistent/file.py:score", "no such file"),
    ("frugallm_no_such_module_xyz:score", "cannot import"),
    ("json:no_such_function", "no callable"),
    ("json:1abc", "valid function name"),
])
def test_malformed_reward_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ConfigError, match=message):
        UserReward(spec)
