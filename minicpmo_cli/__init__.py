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
import importlib.machinery
import importlib.util
import sys
import threading

__version__ = "0.1.0"

_LAZY = {
    "MiniCPMOConfig": "minicpmo_cli.model.config",
    "MiniCPMO": "minicpmo_cli.generation.guide",
    "MiniCPMOProcessor": "minicpmo_cli.processing.processor",
}


def _register() -> None:
    from minicpmo_cli import registration

    registration.register()


def _inside_our_module_import(ignore: str | None = None) -> bool:
    """True while one of this package's modules (other than ``ignore``) is still executing its top level."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "<module>" and name.startswith("minicpmo_cli.") and name != ignore:
            return True
        frame = frame.f_back
    return False


def _module_ready(name: str) -> None:
    """Called on the last line of our modules that import transformers: register if that was pending."""
    finder = next((f for f in sys.meta_path if isinstance(f, _RegisterAfterTransformers)), None)
    if (finder is not None and finder.transformers_loaded and threading.get_ident() == finder.thread
            and not _inside_our_module_import(ignore=name)):
        finder._uninstall()
        _register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Registers once ``transformers`` has been imported and none of our modules is half-initialised.

    It watches every import: the import of ``transformers`` itself (registering right after it loads), and,
    when it was one of our own modules that imported transformers, the next import that happens after that
    module has finished (registering then would otherwise re-import the half-initialised module).
    """

    def __init__(self, transformers_loaded: bool = False) -> None:
        self.transformers_loaded = transformers_loaded
        # Once transformers is loaded, only the thread that imported it registers from here. Another thread's
        # import (an audio-decoding thread importing PyAV while that one is half-way through transformers'
        # modeling modules) must not: registering imports transformers' processing modules, which wait on the
        # first thread's module locks while it waits on theirs, a cross-thread import deadlock.
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if self.transformers_loaded:
            if threading.get_ident() != self.thread:
                return None  # that thread registers at its next import
            if not _inside_our_module_import():
                self._uninstall()
                _register()
            return None
        if name != "transformers" or "transformers" in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            self.thread = threading.get_ident()
            load(module)
            self.transformers_loaded = True
            if not _inside_our_module_import():
                self._uninstall()
                _register()

        spec.loader.exec_module = exec_module
        return spec

    def _uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _register_now_or_later() -> None:
    loaded = "transformers" in sys.modules
    if loaded and not _inside_our_module_import():
        _register()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers(transformers_loaded=loaded))


_register_now_or_later()


def __getattr__(name: str):
    if name in _LAZY:
        _register()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minicpmo_cli' has no attribute {name!r}")
