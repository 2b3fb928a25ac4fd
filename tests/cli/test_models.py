"""`minicpmo models` / `models pull` / `models rm` on a fake Hugging Face cache built here in HF_HOME (the layout
huggingface_hub's scan_cache_dir reads: models--owner--name/{blobs,snapshots/REV,refs/main}). Nothing touches
the network: `pull` runs with --offline or with the hub's download replaced by one that writes the cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

BF16, INT4 = "openbmb/MiniCPM-o-2_6", "openbmb/MiniCPM-o-2_6-int4"
REV_A, REV_B = "a" * 40, "b" * 40
CONFIG = json.dumps({"model_type": "minicpmo", "_name_or_path": BF16}).encode()
WEIGHTS = b"\0" * 3000


def put_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """Files of ``repo_id`` at ``commit`` as the hub stores them: blobs by hash, snapshot symlinks, a ref."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in a fresh HF_HOME (huggingface_hub reads its constants at import: set them too)."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def rows(cli, *args) -> list[dict]:
    code, out, err = cli(*args, "models", "--json")
    assert code == 0, err
    return json.loads(out)


def test_models_lists_the_official_checkpoints_sizes_revisions_and_the_resolved_one(cli, hub):
    put_snapshot(hub, BF16, REV_A, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    put_snapshot(hub, BF16, REV_B, {"config.json": CONFIG}, ref="dev")  # an older pull, weights never fetched
    put_snapshot(hub, "me/minicpmo-finetune", REV_A, {"config.json": CONFIG, "model.safetensors": b"1" * 10})
    put_snapshot(hub, "openai/whisper-tiny", REV_A, {"config.json": b'{"model_type": "whisper"}'})
    (hub / "models--openbmb--MiniCPM-o-2_6-int4" / "blobs").mkdir(parents=True)
    (hub / "models--openbmb--MiniCPM-o-2_6-int4" / "blobs" / "abc.incomplete").write_bytes(b"x" * 2500)

    listed = {(r["id"], r["revision"]): r for r in rows(cli)}
    assert set(listed) == {(BF16, REV_A), (BF16, REV_B), (INT4, None), ("me/minicpmo-finetune", REV_A)}
    bf16 = listed[BF16, REV_A]
    assert bf16["status"] == "complete" and bf16["refs"] == ["main"] and bf16["selected"]
    assert bf16["size"] == len(CONFIG) + len(WEIGHTS)
    assert listed[BF16, REV_B]["status"] == "incomplete (weights missing)" and not listed[BF16, REV_B]["selected"]
    assert listed[INT4, None]["status"] == "partial download"
    assert [r["selected"] for r in rows(cli, "--revision", "dev")].count(True) == 1
    assert next(r for r in rows(cli, "--revision", "dev") if r["selected"])["revision"] == REV_B

    code, out, err = cli("models")
    assert code == 0 and err == ""
    table = out.splitlines()
    star = next(line for line in table if line.startswith("*"))
    assert BF16 in star and REV_A[:12] in star and "3.1 kB" in star and "complete (main)" in star
    int4 = next(line for line in table if INT4 in line)
    assert "not downloaded" not in int4 and "2.5 kB of an interrupted download" in int4 and "resumes" in int4
    assert "whisper" not in out and f"--model {BF16} resolves to revision {REV_A[:12]}" in out
    assert str(hub) in out
    assert cli("models", "list").stdout == out

    code, out, _ = cli("--model", INT4, "models")
    assert code == 0 and not any(line.startswith("*") for line in out.splitlines())
    assert f"--model {INT4} is not in the cache" in out and f"minicpmo models pull {INT4}" in out


def test_models_on_an_empty_or_missing_cache(cli, hub, tmp_path):
    assert [(r["id"], r["status"]) for r in rows(cli)] == [(BF16, "not downloaded"), (INT4, "not downloaded")]
    hub.rmdir()
    code, out, err = cli("models")
    assert code == 0 and "not downloaded" in out and err == ""
    code, out, _ = cli("--model", str(tmp_path), "models")
    assert code == 0 and "is a local folder" in out


def test_models_reads_hf_home_in_a_fresh_process(cli_process, tmp_path):
    cache = tmp_path / "home" / "hub"
    put_snapshot(cache, INT4, REV_A, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "home")
    code, out, err = cli_process("--model", INT4, "models", "--json", env=env)
    assert code == 0, err
    found = next(r for r in json.loads(out) if r["id"] == INT4)
    assert found["selected"] and found["status"] == "complete" and found["path"].startswith(str(cache))


def test_pull_downloads_the_model_files_into_the_cache(cli, hub, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        assert not kwargs.get("local_files_only")
        return str(put_snapshot(hub, repo_id, REV_A, {"config.json": CONFIG, "model.safetensors": WEIGHTS}))

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    code, out, err = cli("--revision", "main", "models", "pull", INT4)
    assert code == 0, err
    snapshot = hub / "models--openbmb--MiniCPM-o-2_6-int4" / "snapshots" / REV_A
    assert out.strip() == f"{INT4} at revision {REV_A[:12]}: 3.1 kB, complete, in {snapshot}"
    assert f"downloading {INT4} into {hub}" in err and "resumes" in err
    [(repo_id, kwargs)] = calls
    assert repo_id == INT4 and kwargs["revision"] == "main" and "*.safetensors" in kwargs["allow_patterns"]
    assert next(r for r in rows(cli) if r["id"] == INT4)["status"] == "complete"

    code, _, err = cli("-q", "models", "pull")  # no ID: --model's
    assert code == 0 and err == "" and calls[-1][0] == BF16


def test_pull_offline_uses_the_cache_only(cli, hub):
    code, out, err = cli("--offline", "models", "pull", INT4)
    assert code == 4 and out == "" and len(err.strip().splitlines()) == 1
    assert INT4 in err and "--offline" in err

    put_snapshot(hub, INT4, REV_A, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    code, out, err = cli("--offline", "models", "pull", INT4)
    assert code == 0 and f"{INT4} at revision {REV_A[:12]}" in out and "complete" in out

    put_snapshot(hub, BF16, REV_A, {"config.json": CONFIG})
    code, out, err = cli("--offline", "models", "pull", BF16)
    assert code == 4 and "weights missing" in err and len(err.strip().splitlines()) == 1


def test_pull_of_a_local_folder_is_a_usage_error(cli, hub, tmp_path):
    code, out, err = cli("models", "pull", str(tmp_path))
    assert code == 2 and "owner/name" in err and len(err.strip().splitlines()) == 1


def test_rm_asks_and_frees_the_space(cli, hub):
    put_snapshot(hub, BF16, REV_A, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    put_snapshot(hub, BF16, REV_B, {"config.json": CONFIG, "model.safetensors": b"2" * 1000}, ref="dev")
    (hub / "models--openbmb--MiniCPM-o-2_6" / "blobs" / "x.incomplete").write_bytes(b"x" * 500)
    put_snapshot(hub, INT4, REV_A, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    folder = hub / "models--openbmb--MiniCPM-o-2_6"

    code, out, err = cli("models", "rm", BF16)  # stdin is not a terminal, and no -y
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "-y" in err and folder.is_dir()

    code, out, err = cli("models", "rm", BF16, stdin="n\n", tty=True)
    assert code == 0 and "[y/N]" in err and "nothing removed" in err and folder.is_dir()

    code, out, err = cli("models", "rm", BF16, stdin="y\n", tty=True)
    size = len(CONFIG) + len(WEIGHTS) + 1000 + 500  # the config blob is shared by both revisions
    assert code == 0 and not folder.exists(), err
    assert f"removed {BF16} ({size / 1000:.1f} kB, 2 revision(s))" in out
    assert [r["id"] for r in rows(cli) if r["revision"]] == [INT4]  # the other model is untouched

    code, out, err = cli("models", "rm", "-y", INT4)
    assert code == 0 and not (hub / "models--openbmb--MiniCPM-o-2_6-int4").exists() and f"removed {INT4}" in out


def test_rm_of_what_is_not_cached_or_not_an_id(cli, hub, tmp_path):
    code, out, err = cli("models", "rm", "-y", INT4)
    assert code == 1 and "not in the Hugging Face cache" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("models", "rm", "-y", str(tmp_path))
    assert code == 2 and tmp_path.is_dir()
