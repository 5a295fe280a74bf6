"""``macft serve``: an OpenAI-compatible server with continuous batching over many adapters.

http.py (routes, checks, errors, SSE) and scheduler.py (continuous batching) are shared;
each backend implements engine.py's Engine (macft/mlx/serving.py, cuda_bridge/serving.py).
"""
