"""``MiniCPMO``: the usage guide's model class, the modules of model/omni.py with the guide's methods bound.

The guide (and the model card) call ``model.chat(...)``, ``model.generate(**inputs, ...)``,
``model.reset_session()``, ``model.streaming_prefill(...)`` / ``model.streaming_generate(...)`` and read session
attributes such as ``model.llm_past_key_values``. Those need prompts (processing/) and decoding (generation/),
so they live here, one layer above model/, which stays pure modules and loading. ``AutoModel`` and
``minicpmo_cli.MiniCPMO`` resolve to this class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minicpmo_cli.model.omni import MiniCPMOModel


class MiniCPMO(MiniCPMOModel):
    """MiniCPM-o 2.6 with the guide's interface (see API.md): chat, generate, streaming sessions."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.reset_session()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, load_processor: bool = True,
                        **kwargs: Any) -> MiniCPMO:
        """As :meth:`MiniCPMOModel.from_pretrained`, plus the checkpoint's processor when its files are there
        (``load_processor=False`` skips it)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if load_processor:
            model.processor = _try_load_processor(Path(model.config._name_or_path))
        return model

    # ------------------------------------------------------------------ sessions
    def reset_session(self) -> None:
        """Forget the default streaming session (KV caches, turn state; see generation/session.py)."""
        from minicpmo_cli.generation.session import OmniSession

        if getattr(self, "_session", None) is None:
            self._session = OmniSession(self)
        self._session.reset()

    def new_session(self):
        """A streaming conversation of its own (its caches and turn state), independent of the default one
        that ``streaming_prefill`` / ``streaming_generate`` use; several can be used one after another or
        interleaved on this one model."""
        from minicpmo_cli.generation.session import OmniSession

        return OmniSession(self)

    def get_audio_embedding(self, data: dict, chunk_length: float = -1, stream_input: bool = False) -> list:
        """Audio embeddings per sample; ``stream_input`` encodes with the default session's streaming cache."""
        if stream_input:
            embeds, self.audio_past_key_values = self.streaming_audio_embedding(data, self.audio_past_key_values)
            return embeds
        return super().get_audio_embedding(data, chunk_length)

    # ------------------------------------------------------------------ chat / generate
    def get_sys_prompt(self, ref_audio=None, mode: str = "default", language: str = "zh") -> dict:
        from minicpmo_cli.processing.prompts import get_sys_prompt

        return get_sys_prompt(ref_audio=ref_audio, mode=mode, language=language)

    def generate(self, input_ids=None, **kwargs: Any):
        """Generate from processor outputs; returns the answer text (see generation/text.py)."""
        from minicpmo_cli.generation.text import generate

        return generate(self, input_ids=input_ids, **kwargs)

    def chat(self, image=None, msgs=None, tokenizer=None, processor=None, **kwargs: Any):
        """The reference ``chat()``: messages in, answer text out (see generation/text.py)."""
        from minicpmo_cli.generation.text import chat

        return chat(self, msgs=msgs, image=image, tokenizer=tokenizer, processor=processor, **kwargs)

    def streaming_prefill(self, session_id, msgs, processor=None, tokenizer=None, **kwargs: Any) -> None:
        """Append one message to the session's cache (see generation/session.py)."""
        from minicpmo_cli.generation.session import streaming_prefill

        return streaming_prefill(self, session_id, msgs, processor=processor, tokenizer=tokenizer, **kwargs)

    def streaming_generate(self, session_id=None, processor=None, tokenizer=None, **kwargs: Any):
        """Answer the session: an iterator of text (and speech) pieces (see generation/session.py)."""
        from minicpmo_cli.generation.session import streaming_generate

        return streaming_generate(self, session_id, processor=processor, tokenizer=tokenizer, **kwargs)


def _session_attribute(name: str) -> property:
    """The reference's session attribute ``model.<name>``, read from and written to the default session."""
    def get(self):
        return getattr(self._session, name)

    def set(self, value):
        setattr(self._session, name, value)

    return property(get, set, doc=f"The default streaming session's {name} (generation/session.py).")


for _name, _field in (("session_id", "session_id"), ("new_user_msg", "new_user_msg"),
                      ("llm_generated", "llm_generated"), ("llm_generate_completed", "llm_generate_completed"),
                      ("llm_past_key_values", "llm_cache"), ("audio_past_key_values", "audio_cache")):
    setattr(MiniCPMO, _name, _session_attribute(_field))


def _try_load_processor(folder: Path):
    """The checkpoint's processor, or None when its files are not there (e.g. a weights-only folder)."""
    if not (folder / "tokenizer_config.json").exists():
        return None
    from minicpmo_cli.processing.processor import MiniCPMOProcessor

    return MiniCPMOProcessor.from_pretrained(folder)


# Last line on purpose: lets `import minicpmo_cli` finish registering the Auto classes (see __init__.py).
__import__("minicpmo_cli")._module_ready(__name__)
