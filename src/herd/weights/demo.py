"""Where the bundled demo model lives (see docs/demo-model.md)."""

from __future__ import annotations

from pathlib import Path

from ..errors import HerdError

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"


def demo_path() -> Path:
    """The bundled demo model: a GGUF file or an HF directory under herd/data/demo."""
    ggufs = sorted(DEMO_DIR.glob("*.gguf")) if DEMO_DIR.is_dir() else []
    if ggufs:
        return ggufs[0]
    if (DEMO_DIR / "config.json").is_file():
        return DEMO_DIR
    raise HerdError("no bundled demo model in this installation yet: pass a model with -m (directory, .gguf or hub id)")
