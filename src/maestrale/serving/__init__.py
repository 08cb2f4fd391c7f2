"""The OpenAI-compatible server (`maestrale serve`): FastAPI and uvicorn, the optional `serve` extra."""

import importlib.util


def require_serve_extras() -> None:
    """ImportError naming the pip command when FastAPI or uvicorn is missing."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the server needs {' and '.join(missing)}, which are not installed: "
                          "pip install 'maestrale[serve]'")
