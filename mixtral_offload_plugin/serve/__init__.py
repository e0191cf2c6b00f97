"""The OpenAI-compatible server (`mixtral-offload serve`): app.py (the HTTP routes), engine.py (the model behind them),
protocol.py (the wire format), cli.py (the command) and ray_app.py (Ray Serve replicas). FastAPI and uvicorn are
imported lazily (`pip install 'mixtral-offload-plugin[serve]'`)."""

from __future__ import annotations
