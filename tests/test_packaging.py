"""Packaging and start-up: the distribution name, extras, license files, and a lazy `import sparq`
(torch and transformers load only when a name needs them, so `sparq --help` is quick; its time is
measured by benchmarks/cli_startup.py, not asserted here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


HEAVY = ("torch", "transformers", "torch.distributed.tensor", "triton", "matplotlib", "numpy")


def test_import_sparq_and_the_cli_module_load_nothing_heavy():
    res = _run("import sys, sparq, sparq.tools.cli, sparq.tools.eval.command\n"
               f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_public_names_still_resolve_lazily():
    res = _run("import sys, sparq\n"
               "assert 'torch' not in sys.modules\n"
               "names = ['SparQConfig', 'sparq_attention', 'dense_attention', 'SparQCache', 'enable', 'disable', "
               "'enabled', 'is_enabled', 'register', 'FastDecoder', 'fast_generate', '__version__']\n"
               "assert set(names) <= set(sparq.__all__) and set(names) <= set(dir(sparq))\n"
               "assert all(getattr(sparq, n) is not None for n in names)\n"
               "from sparq import enabled, FastDecoder, sparq_attention\n"
               "assert sparq.hf.cache_arg and sparq.methods.build_method and sparq.models.load\n"
               "print('torch' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_unknown_attribute_is_an_attribute_error():
    import sparq

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sparq.nope  # noqa: B018


def test_a_broken_dependency_is_not_swallowed():
    """A failing transformers import surfaces as its own error, not as a missing `sparq.enabled`."""
    res = _run("import sys\n"
               "class Broken:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'transformers':\n"
               "            raise ImportError('transformers is broken here')\n"
               "sys.meta_path.insert(0, Broken())\n"
               "import sparq\n"
               "sparq.enabled\n")
    assert res.returncode != 0
    assert "transformers is broken here" in res.stderr and "has no attribute 'enabled'" not in res.stderr


def test_help_answers_without_loading_torch():
    res = _run("import sys\n"
               "from typer.testing import CliRunner\n"
               "from sparq.tools.cli import app\n"
               "r = CliRunner().invoke(app, ['--help'])\n"
               "assert r.exit_code == 0 and 'generate' in r.output, r.output\n"
               "print('torch' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "sparq-attention"  # `pip install sparq` is an unrelated project
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    setuptools_req = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")][0]
    assert int(re.search(r">=(\d+)", setuptools_req).group(1)) >= 77  # SPDX license strings
    assert project["scripts"]["sparq"] == "sparq.__main__:main"
    deps = " ".join(project["dependencies"])
    for extra_only in ("typer", "rich", "matplotlib", "gguf", "accelerate"):
        assert extra_only not in deps
    assert re.search(r"transformers>=5\.17,<6", deps)
    extras = project["optional-dependencies"]
    for pkg in ("typer", "rich", "matplotlib", "gguf"):  # README's commands install these extras
        assert any(pkg in r for r in extras["all"]) and any(pkg in r for r in extras["test"])
    assert any(c.startswith("Typing ::") for c in project["classifiers"]) and project["urls"]
    readme = ROOT / project["readme"]["file"]
    text = readme.read_text()
    assert "pip install sparq-attention" in text and "pip install -e" not in text
    assert not re.search(r"\]\((?!https?://)[^)]+\)", text), "relative links do not render on PyPI"
    assert (SRC / "sparq" / "py.typed").exists()
    assert meta["tool"]["setuptools"]["package-data"]["sparq"] == ["py.typed"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and (ROOT / "CHANGELOG.md").exists()


def test_accelerate_is_never_imported():
    hits = [p for p in SRC.rglob("*.py") if re.search(r"^\s*(import|from)\s+accelerate\b", p.read_text(), re.M)]
    assert not hits


def test_readme_first_screen_is_two_commands_with_the_extras():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text.split("## ")[0], re.S)
    assert len(blocks) == 2
    assert '".[all]"' in blocks[0] and "sparq demo" in blocks[0]
    assert '".[test]"' in blocks[1] and "pytest" in blocks[1]
