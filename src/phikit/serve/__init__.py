"""phikit's HTTP server: OpenAI- and Ollama-compatible routes, /health, /metrics and a web chat at /ui.

FastAPI and uvicorn are imported only here (`pip install phikit[serve]`).
"""

from .app import create_app, serve
from .state import Limits, ServeConfig

__all__ = ["create_app", "serve", "ServeConfig", "Limits"]
