"""chat loads only the towers its message needs; the REPL loads the vision/audio tower when /image, /audio
or /video first asks, once, and answers as a model loaded with every tower."""

from __future__ import annotations

import io

import numpy as np
import pytest

GREEDY = ["--no-sampling", "--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "5"]


@pytest.fixture
def cli(cli, fake_engine):
    """In-process on the fake engine: which towers the CLI asks for is what is tested here."""
    return cli.with_args("--device", "cpu", "-v")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import soundfile
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / "p.png")
    t = np.arange(16000) / 16000
    soundfile.write(folder / "a.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    return folder


@pytest.mark.parametrize("extra,towers", [
    ([], "vision=False, audio=False"),
    (["-i", "p.png"], "vision=True, audio=False"),
    (["-a", "a.wav"], "vision=False, audio=True"),
])
def test_chat_loads_only_what_the_message_needs(cli, fake_engine, tiny_ckpt, media, extra, towers):
    extra = [str(media / e) if e.endswith((".png", ".wav")) else e for e in extra]
    code, out, err = cli("--model", tiny_ckpt, "chat", "Describe.", *extra, *GREEDY)
    assert code == 0, err
    assert f"({towers}, tts=False)" in err  # -v's loading line
    vision, audio = (part.split("=")[1] == "True" for part in towers.split(", "))
    assert [load.towers for load in fake_engine.loads] == [{"vision": vision, "audio": audio, "tts": False}]
    assert out.startswith("echo: Describe. [")


def test_repl_loads_a_tower_once_when_asked(tiny_ckpt, media):
    from minicpmo_cli.api.chat import Conversation
    from minicpmo_cli.api.engine import DecodeOptions, LoadOptions, load
    from minicpmo_cli.cli.repl import Repl
    from minicpmo_cli.media.audio import load_audio
    from minicpmo_cli.media.image import load_image

    decode = DecodeOptions(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=5)
    lazy = load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=False, audio=False)
    assert not hasattr(lazy.model, "vpm") and not hasattr(lazy.model, "apm")
    lines = iter([f"/image {media / 'p.png'}", "What is it?", f"/image {media / 'p.png'}", f"/audio {media / 'a.wav'}",
                  "And now?", "/exit"])
    out = io.StringIO()
    Repl(lazy, Conversation(), decode, read_line=lambda _prompt: next(lines), out=out).run()
    text = out.getvalue()
    assert text.count("[loading the vision model]") == 1 and text.count("[loading the audio model]") == 1
    assert lazy.towers["vision"] and lazy.towers["audio"] and hasattr(lazy.model, "vpm")

    full = load(LoadOptions(model=str(tiny_ckpt), device="cpu"), vision=True, audio=True)
    image, clip = load_image(media / "p.png"), load_audio(media / "a.wav")
    first = full.generate([{"role": "user", "content": [image, "What is it?"]}], decode)
    second = full.generate([{"role": "user", "content": [image, "What is it?"]},
                            {"role": "assistant", "content": [first]},
                            {"role": "user", "content": [image, clip, "And now?"]}], decode,
                           use_tts_template=True)
    assert f"{first}\n" in text and f"{second}\n" in text
