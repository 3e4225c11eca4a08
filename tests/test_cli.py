"""CLI smoke tests on the bundled model (SmolLM2-135M, converted once and cached)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from sparq.cli import app

runner = CliRunner()


def test_help_on_every_command():
    for args in ([], ["generate"], ["demo"], ["info"], ["bench"]):
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


@pytest.mark.slow
def test_generate_and_demo_on_bundled_model(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The capital of France is")
    result = runner.invoke(app, ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "6",
                                 "--method", "sparq", "--k", "4", "--r", "8", "--local-window", "1"])
    assert result.exit_code == 0, result.output
    m = re.search(r"attention\s+data\s+read\s+([0-9.]+)\s+of\s+dense", result.output)
    assert m and 0 < float(m.group(1)) < 1, result.output
    result = runner.invoke(app, ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "6", "--fast"])
    assert result.exit_code == 0 and "fast loop" in result.output, result.output
    for method in ("quest", "h2o"):  # --fast runs any method, not only dense and sparq
        result = runner.invoke(app, ["generate", "hi", "--fast", "--method", method, "--max-new-tokens", "3"])
        assert result.exit_code == 0 and method in result.output and "fast loop" in result.output, result.output
    result = runner.invoke(app, ["demo", "--context", "400", "--keys", "1"])
    assert result.exit_code == 0, result.output
    assert "correct" in result.output and "of dense" in result.output
