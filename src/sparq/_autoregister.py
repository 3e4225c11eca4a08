"""Register attn_implementation="sparq" with transformers the moment its modeling code loads.

Registering needs transformers (and so torch), which `import sparq` must not load (that keeps
``sparq --help`` fast). So `import sparq` calls `install`: if transformers' modeling code is
already loaded it registers at once; otherwise a finder on ``sys.meta_path`` waits for
``transformers.modeling_utils`` to be imported (by ``from_pretrained``, ``AutoModel...``) and
registers right after it, by importing `sparq.hf`. Either way
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="sparq")`` works after a plain
``import sparq``, in any import order.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

TARGET = "transformers.modeling_utils"


def _register() -> None:
    try:
        importlib.import_module("sparq.hf")  # registers on import
    except Exception as e:  # noqa: BLE001 - never break the user's import of transformers; say why
        warnings.warn(f"sparq could not register attn_implementation='sparq' with transformers "
                      f"({type(e).__name__}: {e}); sparq.enable will raise the same error", stacklevel=3)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        if self in sys.meta_path:  # once: and the lookup below must not find us again
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
