"""The models shipped in the repository (models/<name>/), addressable by name wherever a model path is accepted."""

from __future__ import annotations

import os
from pathlib import Path

# The repository's models/ (an editable install or a checkout); an installed package (the Docker image) points
# DIFFUSERVE_MODELS_DIR at wherever models/ was copied.
MODELS_DIR = Path(os.environ.get("DIFFUSERVE_MODELS_DIR") or Path(__file__).resolve().parents[2] / "models")
DEFAULT_MODEL = "tiny-text"


def bundled_names() -> list[str]:
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model(name_or_path: str | None) -> str:
    """A directory path is returned as is; a bundled model's name becomes its directory; None -> the default."""
    target = name_or_path or DEFAULT_MODEL
    if Path(target).is_dir():
        return str(target)
    candidate = MODELS_DIR / target
    if (candidate / "config.json").is_file():
        return str(candidate)
    known = ", ".join(bundled_names()) or "none in this checkout"
    raise FileNotFoundError(f"model {target!r} is neither a directory nor a bundled model (bundled: {known})")
