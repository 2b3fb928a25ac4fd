"""The Engine protocol (api/protocol.py): the real engine and the tests' fake engine both have its members;
only an engine without a model provides the model steps, so the task modules run them on the real one's model."""

from __future__ import annotations

from minicpmo_cli.api.engine import Engine, LoadOptions
from minicpmo_cli.api.protocol import Engine as EngineProtocol
from minicpmo_cli.api.protocol import ModelSteps, own_steps


def test_the_real_engine_has_the_protocol_and_leaves_the_model_steps_to_its_model():
    real = Engine(model=None, processor=None, device="cpu", dtype=None, options=LoadOptions())
    assert isinstance(real, EngineProtocol)
    assert not isinstance(real, ModelSteps) and own_steps(real) is None


def test_the_fake_engine_has_the_protocol_and_the_model_steps(tiny_ckpt):
    from tests.fake_engine import Recorder

    fake = Recorder().load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=True)
    assert isinstance(fake, EngineProtocol) and own_steps(fake) is fake
    assert fake.towers == {"vision": False, "audio": True, "tts": False} and not fake.has_tts
    fake.enable_tts()
    assert fake.has_tts
