"""`minicpmo serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a web page at `/`.

One model is loaded once (in the background: /health says 503 until it is ready); every request that needs
it goes through one worker thread (worker.py), so no two requests ever share the model's cache. The routes
call only `minicpmo_cli.api`. fastapi and uvicorn come with the `serve` extra: `pip install -e ".[serve]"`.
"""
