"""`asr --shard`, `--workers`, `--devices` and `--ray` on the tiny checkpoint: the same files as one process.

40 short clips (tone bursts made with numpy: quick to make, and every one a different length) plus one corrupt
file go through one in-process run, which is the reference; every other mode must write byte-identical files,
fail the same input and exit with the same code (3: one input failed, the others were done).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import main_exit_code

CLIPS = 40
FAST = ["--max-new-tokens", "3", "--batch-size", "2"]


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> Path:
    import soundfile

    folder = tmp_path_factory.mktemp("inbox")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(14)
    for i in range(CLIPS):
        seconds = 0.3 + 0.05 * (i % 9)
        t = np.arange(int(16000 * seconds)) / 16000
        tone = 0.3 * np.sin(2 * np.pi * (180 + 15 * i) * t) + 0.01 * rng.standard_normal(len(t))
        where = folder / "sub" if i % 5 == 0 else folder  # some in a sub-folder: outputs keep the layout
        soundfile.write(where / f"clip{i:02d}.wav", tone.astype(np.float32), 16000)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_ckpt, inbox, tmp_path_factory) -> dict[str, bytes]:
    """One process, every format: the files each other mode must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    assert main_exit_code("--model", tiny_ckpt, "asr", inbox, "-r", "-o", out, "-f", "all", *FAST) == 3
    written = files(out)
    assert len(written) == 5 * CLIPS and not any("corrupt" in name for name in written)
    return written


def base_args(tiny_ckpt, inbox, out) -> list:
    return ["--model", tiny_ckpt, "asr", inbox, "-r", "-o", out, "-f", "all", *FAST]


# ---------------------------------------------------------------------------------------------- shards
def test_shard_is_a_hash_of_the_relative_name():
    from minicpmo_cli.api.parallel import in_shard, parse_shard, shard_key, shard_of

    assert shard_key("/data/inbox/sub/a.wav", "sub") == "sub/a.wav" == shard_key("elsewhere/a.wav", Path("sub"))
    assert shard_key("-") == "-"
    expected = int.from_bytes(hashlib.sha1(b"sub/a.wav").digest()[:8], "big") % 7  # not Python's salted hash()
    assert shard_of("sub/a.wav", 7) == expected
    assert parse_shard("2/4").index == 2 and parse_shard(" 0 / 1 ").count == 1
    keys = [f"k{i}.wav" for i in range(200)]
    parts = [[k for k in keys if in_shard(k, parse_shard(f"{i}/3"))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(keys) and all(20 < len(p) < 120 for p in parts)


@pytest.mark.parametrize("value", ["4/4", "-1/4", "1/0", "a/b", "3", "1/2/3"])
def test_bad_shard_is_one_usage_line(tiny_ckpt, inbox, value, cli):
    code, _, err = cli("--model", tiny_ckpt, "asr", inbox, "--shard", value)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--shard must be I/N" in err and value in err


def test_shards_together_are_the_whole_run(tiny_ckpt, inbox, reference, tmp_path, cli):
    union: dict[str, bytes] = {}
    counts, errors = [], []
    for index in range(3):
        out = tmp_path / f"shard{index}"
        code, _, err = cli(*base_args(tiny_ckpt, inbox, out), "--shard", f"{index}/3")
        errors.append(err)
        part = files(out) if out.exists() else {}
        assert code in (0, 3)  # 3 only for the shard that holds corrupt.wav
        assert not set(part) & set(union)  # disjoint
        union.update(part)
        counts.append(len(part) // 5)
    assert union == reference
    assert all(count > 0 for count in counts)
    err = "".join(errors)
    assert sum(int(n) for n in re.findall(r"shard \d/3: (\d+) of 41 input", err)) == CLIPS + 1

    # Stable across machines: the same folder elsewhere (another mount point) picks the same inputs.
    from minicpmo_cli.cli.inputs import resolve_inputs
    from minicpmo_cli.cli.scale import select_shard

    moved = tmp_path / "mounted" / "elsewhere"
    moved.parent.mkdir()
    os.symlink(inbox, moved)
    for index in range(3):
        here = select_shard(resolve_inputs([str(inbox)], None, True), f"{index}/3")
        there = select_shard(resolve_inputs([str(moved)], None, True), f"{index}/3")
        assert [Path(i.path).relative_to(inbox) for i in here] == [Path(i.path).relative_to(moved) for i in there]
        assert len(here) == counts[index] + (1 if any("corrupt" in i.path for i in here) else 0)


# ---------------------------------------------------------------------------------------------- devices
def test_devices_are_parsed_and_checked():
    from minicpmo_cli.api.parallel import parse_devices, worker_devices
    from minicpmo_cli.errors import EnvironmentProblem, UsageError

    assert parse_devices("0,2", gpu_count=4) == ["cuda:0", "cuda:2"]
    assert parse_devices("cuda:1, 0", gpu_count=2) == ["cuda:1", "cuda:0"]
    assert parse_devices("all", gpu_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    for bad, error in [("0,0", UsageError), ("x", UsageError), ("4", EnvironmentProblem)]:
        with pytest.raises(error):
            parse_devices(bad, gpu_count=4)
    with pytest.raises(EnvironmentProblem, match="no CUDA GPU"):
        parse_devices("all", gpu_count=0)
    assert worker_devices(None, 3, "cpu") == ["cpu"] * 3
    assert worker_devices(None, None, "cuda:1") == ["cuda:1"]


def test_devices_on_a_machine_without_gpus_is_exit_4(tiny_ckpt, inbox, tmp_path, cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli(*base_args(tiny_ckpt, inbox, tmp_path / "out"), "--devices", "0,1")
    assert code == 4
    assert err.strip().splitlines()[-1] == ("minicpmo: error: --devices 0,1: no CUDA GPU is usable here "
                                            "(use --workers N on the CPU)")


# ---------------------------------------------------------------------------------------------- workers
def test_two_workers_write_the_same_files(tiny_ckpt, inbox, reference, tmp_path, cli):
    out = tmp_path / "out"
    code, _, err = cli("-v", *base_args(tiny_ckpt, inbox, out), "--workers", "2")
    assert code == 3
    assert files(out) == reference
    assert len(re.findall(r"^worker \d started on cpu \(pid \d+\)$", err, re.M)) == 2
    assert "corrupt.wav" in err and "1 of 41 inputs failed" in err

    # A rerun finds only the corrupt file left: one worker for it (no more workers than inputs), same exit.
    code, _, err = cli("-v", *base_args(tiny_ckpt, inbox, out), "--workers", "2")
    assert code == 3
    assert "skipped 40 input(s)" in err and len(re.findall("started on", err)) == 1


@pytest.mark.parametrize("mode", ["workers", "ray"])
def test_scale_out_options_run_with_their_defaults(tiny_ckpt, inbox, reference, tmp_path, cli, mode):
    """No --batch-size (nor any other option left at its default) still runs: it crashed with a TypeError.
    Batching changes no transcript, so the files are those of the --batch-size 2 reference."""
    if mode == "ray":
        pytest.importorskip("ray", reason="the [ray] extra is not installed")
    out = tmp_path / "out"
    extra = ["--workers", "2"] if mode == "workers" else ["--ray", "--workers", "1"]
    code, _, err = cli("--model", tiny_ckpt, "asr", inbox, "-r", "-o", out, "-f", "all", "--max-new-tokens", "3",
                       *extra)
    assert code == 3, err
    assert "Traceback" not in err and "1 of 41 inputs failed" in err
    assert files(out) == reference


def kill_a_worker_after_three_outputs(tmp_path, monkeypatch):
    """Workers write their pids into a folder; after the third output one of them is killed with SIGKILL
    (mid-run: both workers hold inputs). Returns (the pid folder, outputs per input path, the killed pid)."""
    from minicpmo_cli.api import parallel
    from minicpmo_cli.cli import asr as asr_cli

    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv(parallel.PID_DIR_ENV, str(pids))
    emitted: dict[str, int] = {}
    killed: list[int] = []
    real_emit = asr_cli.Sink.emit

    def emit_then_kill(self, item, record):
        emitted[item.path] = emitted.get(item.path, 0) + 1
        real_emit(self, item, record)
        if sum(emitted.values()) == 3:
            killed.append(int(sorted(pids.iterdir())[0].name))
            os.kill(killed[0], signal.SIGKILL)

    monkeypatch.setattr(asr_cli.Sink, "emit", emit_then_kill)
    return pids, emitted, killed


def test_a_killed_worker_loses_nothing_and_nothing_is_written_twice(tiny_ckpt, inbox, reference, tmp_path,
                                                                     cli, monkeypatch):
    pids, emitted, killed = kill_a_worker_after_three_outputs(tmp_path, monkeypatch)
    out = tmp_path / "out"
    code, _, err = cli(*base_args(tiny_ckpt, inbox, out), "--workers", "2")
    assert code == 3
    back = re.search(rf"worker \d \(pid {killed[0]}, cpu\) died \(killed by SIGKILL\); (\d+) input\(s\) back", err)
    assert back and int(back.group(1)) >= 1, err
    assert len(list(pids.iterdir())) == 3  # the replacement worker
    assert files(out) == reference
    assert sorted(emitted) == sorted(str(p) for p in inbox.rglob("*.wav")) and set(emitted.values()) == {1}


# ---------------------------------------------------------------------------------------------- ray
@pytest.fixture()
def ray_module():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def test_ray_writes_the_same_files(tiny_ckpt, inbox, reference, tmp_path, cli, ray_module):
    """A bare --ray starts a local Ray for the run (and shuts it down after)."""
    out = tmp_path / "out"
    code, _, err = cli("-v", *base_args(tiny_ckpt, inbox, out), "--ray", "--workers", "2")
    assert code == 3
    assert files(out) == reference
    assert "ray: 2 actor(s)" in err and "1 of 41 inputs failed" in err
    assert not ray_module.is_initialized()


def test_ray_retries_a_killed_actor_and_writes_everything_once(tiny_ckpt, inbox, reference, tmp_path, cli,
                                                               monkeypatch, ray_module):
    """A Ray started by the caller (2 CPUs, a small object store) is used as it is, and left running."""
    ray_module.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    pids, emitted, killed = kill_a_worker_after_three_outputs(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert cli(*base_args(tiny_ckpt, inbox, out), "--ray", "--workers", "2").code == 3
    assert killed and len(list(pids.iterdir())) == 3  # Ray restarted the killed actor
    assert files(out) == reference
    assert sorted(emitted) == sorted(str(p) for p in inbox.rglob("*.wav")) and set(emitted.values()) == {1}
    assert ray_module.is_initialized()


# ---------------------------------------------------------------------------------------------- tts --lines
def test_tts_lines_on_two_workers_write_the_same_wavs(tiny_ckpt, tmp_path, cli):
    text = tmp_path / "lines.txt"
    text.write_text("First line.\nSecond line.\n\nThird line.\nFourth line.\nFifth line.\n", encoding="utf-8")
    spoken = {}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        out = tmp_path / name
        assert cli("--model", tiny_ckpt, "--device", "cpu", "--seed", "7", "tts", "--text-file", text,
                   "--lines", "-o", out, "--max-audio-seconds", "0.2", *extra).code == 0
        spoken[name] = files(out)
    assert sorted(spoken["one"]) == [f"000{i}.wav" for i in range(1, 6)]
    assert spoken["two"] == spoken["one"]
    code, _, err = cli("--model", tiny_ckpt, "tts", "Hello.", "-o", tmp_path / "x.wav", "--workers", "2")
    assert code == 2 and "add --lines" in err


def test_a_bare_ray_flag_takes_no_input_as_its_address(tmp_path):
    from minicpmo_cli.cli.scale import ray_flag_args

    folder = tmp_path / "host:1"  # an existing path is an input, whatever it looks like
    folder.mkdir()
    assert ray_flag_args(["asr", "--ray", "in/", "-o", "o"]) == ["asr", "--ray=local", "in/", "-o", "o"]
    assert ray_flag_args(["asr", "in/", "--ray"]) == ["asr", "in/", "--ray=local"]
    assert ray_flag_args(["asr", "--ray", "auto", "x"]) == ["asr", "--ray=auto", "x"]
    assert ray_flag_args(["asr", "--ray", "10.0.0.5:6379"]) == ["asr", "--ray=10.0.0.5:6379"]
    assert ray_flag_args(["asr", "--ray", "ray://head:10001"]) == ["asr", "--ray=ray://head:10001"]
    assert ray_flag_args(["asr", "--ray", str(folder)]) == ["asr", "--ray=local", str(folder)]
    assert ray_flag_args(["chat", "--", "--ray"]) == ["chat", "--", "--ray"]


def test_ray_with_devices_or_a_bad_address_is_a_usage_error(tiny_ckpt, inbox, cli):
    for extra, message in ((["--ray", "--devices", "0"], "--devices does not combine with --ray"),
                           (["--ray=nowhere"], "not a Ray address")):
        code, _, err = cli("--model", tiny_ckpt, "asr", inbox, *extra)
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and message in err
