"""`python -m sparq` and the `sparq` console script: the CLI, with a clear message when its extra is missing."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .tools.cli import app
    except ModuleNotFoundError as e:
        if e.name in ("typer", "click", "rich"):
            sys.exit(f"sparq: the command line needs the 'cli' extra ({e.name} is not installed): "
                     f"pip install 'sparq-attention[cli]'")
        raise
    app()


if __name__ == "__main__":
    main()
