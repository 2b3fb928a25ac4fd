"""The library a script (or the CLI) uses: load a model once, then call task-shaped functions.

    from minicpmo_cli import api
    engine = api.load("openbmb/MiniCPM-o-2_6", tts=False)
    print(api.chat(engine, "What is in this picture?", images=["photo.jpg"]).text)

Importing this package is cheap; torch and transformers come in with :func:`load`.
"""

from minicpmo_cli.api.engine import DecodeOptions, Engine, LoadOptions, load

__all__ = ["DecodeOptions", "Engine", "LoadOptions", "load"]
