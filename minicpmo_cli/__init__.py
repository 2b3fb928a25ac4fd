"""minicpmo: run MiniCPM-o 2.6 natively on current torch and transformers.

``import minicpmo_cli`` registers the model type ``minicpmo`` with transformers' Auto classes (AutoConfig,
AutoModel, AutoTokenizer, AutoProcessor), so the model card's snippets run without ``trust_remote_code``.
Importing stays cheap: when transformers is not imported yet, registration waits until it is (an import
hook), so ``minicpmo --help`` never loads torch or transformers. ``MiniCPMO``, ``MiniCPMOProcessor`` and
``MiniCPMOConfig`` are loaded on first access.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY = {
    "MiniCPMOConfig": "minicpmo_cli.model.config",
    "MiniCPMO": "minicpmo_cli.model.omni",
    "MiniCPMOProcessor": "minicpmo_cli.processing.processor",
}


def _register() -> None:
    from minicpmo_cli import registration

    registration.register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs the registration right after ``transformers`` itself has been imported, once."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            # When one of our own modules is what imports transformers, registering now would import that
            # half-initialised module again; it registers later (lazy attributes, api.load) instead.
            if not _imported_by_this_package():
                _register()

        spec.loader.exec_module = exec_module
        return spec


def _imported_by_this_package() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__", "").startswith("minicpmo_cli."):
            return True
        frame = frame.f_back
    return False


def _register_now_or_later() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


_register_now_or_later()


def __getattr__(name: str):
    if name in _LAZY:
        _register()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minicpmo_cli' has no attribute {name!r}")
