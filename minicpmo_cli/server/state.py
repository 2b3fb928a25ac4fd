"""What the server holds: its settings, the model (loaded in the background), the request pool, the metrics."""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from minicpmo_cli.errors import describe_error
from minicpmo_cli.server.errors import APIError
from minicpmo_cli.server.media import FetchLimits
from minicpmo_cli.server.metrics import Metrics
from minicpmo_cli.server.models import checkpoint_hub_id, openai_name, unknown_model
from minicpmo_cli.server.outbox import STALL_S

DEFAULT_MAX_BATCH = 16  # request threads while the model loads (api.engine's default batch)
from minicpmo_cli.server.worker import Pool

logger = logging.getLogger("minicpmo_cli.server")


@dataclass
class Settings:
    load: Any  # api.LoadOptions
    model_id: str  # the name /v1/models lists first (--served-model-name's first, else --model)
    served_names: tuple[str, ...] = ()  # more names of --served-model-name a,b,...: listed and accepted too
    strict_model_names: bool = False  # --strict-model-names: OpenAI's standard names get a 404
    api_key: str | None = None
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's own limit for audio uploads
    max_queue: int = 64  # requests waiting for a thread at most; more get 429
    max_batch: int | None = 16  # requests running at once (pool threads; rows the LLM engine decodes together);
    # None: the loaded LLM engine's (from its KV budget)
    fetch: FetchLimits = field(default_factory=FetchLimits)
    tts: bool = True  # load the speech tower (speech routes and spoken chat answers)
    seed: int | None = None  # `minicpmo --seed N serve`: the seed of requests that give none
    stall_s: float = STALL_S  # a streamed answer whose client reads nothing this long is cancelled


# Every module a request may import, imported before the loading thread starts: two threads importing
# transformers' lazy modules at once deadlock on Python's import locks (a request arriving while the model loads).
TASK_MODULES = ("torch", "transformers", "minicpmo_cli.registration", "minicpmo_cli.api.chat",
                "minicpmo_cli.api.asr", "minicpmo_cli.api.speech", "minicpmo_cli.api.video",
                "minicpmo_cli.api.voices", "minicpmo_cli.media.audio", "minicpmo_cli.media.image",
                "minicpmo_cli.media.video", "minicpmo_cli.generation.text", "minicpmo_cli.generation.guide",
                "minicpmo_cli.processing.processor")


def import_task_modules() -> None:
    import importlib

    for name in TASK_MODULES:
        importlib.import_module(name)
    from minicpmo_cli import registration

    registration.register()


class ServerState:
    def __init__(self, settings: Settings, engine: Any = None) -> None:
        self.settings = settings
        self.engine = engine
        self.load_error: str | None = None
        self.hub_id = checkpoint_hub_id(str(settings.load.model))  # accepted and listed as a name too
        self.loaded = threading.Event()
        if engine is not None:
            self.loaded.set()
        self.worker = Pool(self.ready_engine, settings.max_batch or DEFAULT_MAX_BATCH, settings.max_queue,
                           stall_s=settings.stall_s)
        if engine is not None:
            self._size_pool()
        self.metrics = Metrics(lambda: self.worker, self.llm_engine, self.tts_engine)
        self.worker.observer = self.metrics

    def llm_engine(self) -> Any:
        """The loaded model's shared LLM engine (continuous batching), or None (none yet, or a fake engine)."""
        return getattr(self.engine, "llm_engine", None)

    def tts_engine(self) -> Any:
        """The TTS engine the speech requests share, once one has made it (reading never makes it), or None."""
        return getattr(self.engine, "tts_frames", None)

    def start_loading(self) -> None:
        if self.engine is None:
            import_task_modules()
            threading.Thread(target=self._load, name="minicpmo-load", daemon=True).start()

    def _load(self) -> None:
        from minicpmo_cli import api

        try:
            self.engine = api.load(self.settings.load, vision=True, audio=True, tts=self.settings.tts,
                                   warn=logger.warning)
            logger.info("model %s loaded", self.settings.model_id)
            self._size_pool()
            # what is loaded now lives as long as the server: kept out of the cyclic collector's full passes,
            # which walk every module and tensor wrapper again and stall every thread meanwhile (measured on
            # the tiny checkpoint's process: 274 ms per full pass before, 0.002 ms after)
            gc.freeze()
        except Exception as exc:  # noqa: BLE001 - /health reports it; requests get a 503
            self.load_error = describe_error(exc)
            logger.error("cannot load the model: %s", self.load_error)
        finally:
            self.loaded.set()

    def _size_pool(self) -> None:
        """Without --max-batch, as many request threads as the LLM engine decodes together."""
        from minicpmo_cli.generation.kv_budget import describe

        llm_engine = self.llm_engine()
        if self.settings.max_batch is None and llm_engine is not None:
            self.worker.resize(llm_engine.max_batch)
            logger.info("%d requests at once (KV cache budget %s)", llm_engine.max_batch,
                        describe(llm_engine.kv_budget))

    def ready_engine(self) -> Any:
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the model is still loading; retry when GET /v1/models answers 200", code="loading")

    def model_names(self) -> list[str]:
        """The names /v1/models lists: the served names, then the checkpoint's hub id."""
        names = [self.settings.model_id, *self.settings.served_names, self.hub_id]
        return list(dict.fromkeys(n for n in names if n))

    def accepts_model(self, name: str, kind: str) -> bool:
        """Whether a request to a route of ``kind`` (chat, transcription, speech, realtime) may name ``name``:
        a listed name, the --model value (or its folder's name), or OpenAI's names of that kind unless strict."""
        model = str(self.settings.load.model).rstrip("/\\")
        if name in self.model_names() or name in (model, model.replace("\\", "/").rsplit("/", 1)[-1]):
            return True
        return not self.settings.strict_model_names and openai_name(name, kind)

    def check_model(self, name: str, kind: str = "chat") -> None:
        """404 for a model this route does not serve (as OpenAI answers); 503 while loading."""
        if not self.accepts_model(name, kind):
            raise unknown_model(name, self.model_names(), kind, self.settings.strict_model_names)
        self.ready_engine()
