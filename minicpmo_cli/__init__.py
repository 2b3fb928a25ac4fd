"""minicpmo: run MiniCPM-o 2.6 natively on current torch and transformers.

Importing the package is cheap. The model classes (``MiniCPMO``, ``MiniCPMOProcessor``, ``MiniCPMOConfig``)
are loaded on first access, which also registers them with transformers' Auto classes.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MiniCPMOConfig": "minicpmo_cli.model.config",
    "MiniCPMO": "minicpmo_cli.model.omni",
    "MiniCPMOProcessor": "minicpmo_cli.processing.processor",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        from minicpmo_cli import registration

        registration.register()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minicpmo_cli' has no attribute {name!r}")
