"""`minicpmo serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a web page at `/`.

One model is loaded once (in the background: /v1/models says 503 until it is ready); requests run at once on
a bounded pool of threads (worker.py) and their decoding meets in the model's shared LLM engine, which
batches them step by step (each request in its own KV slot); /metrics reports both (metrics.py). The routes
call only `minicpmo_cli.api`. fastapi and uvicorn come with the `serve` extra: `pip install -e ".[serve]"`.
"""
