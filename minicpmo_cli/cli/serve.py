"""`minicpmo serve`: the OpenAI-compatible server with its web page (needs the `serve` extra)."""

from __future__ import annotations

import sys

from typing import Optional

import typer

from minicpmo_cli.cli import common

HELP = common.examples_help(
    "Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/audio/transcriptions, "
    "/v1/audio/translations, /v1/audio/speech, /v1/models), Prometheus /metrics and a chat page at /. The "
    "model loads once; up to --max-batch requests run at once, their decoding batched together on it. Other "
    "commands use it with --server URL (or MINICPMO_SERVER).",
    "minicpmo serve",
    "minicpmo serve --host 0.0.0.0 --port 9000 --api-key secret",
    "minicpmo --model ./ckpt serve --served-model-name minicpmo,omni --strict-model-names",
    "MINICPMO_SERVER=http://127.0.0.1:8080 minicpmo asr meeting.mp3",
)


def register(app: typer.Typer) -> None:
    app.command(help=HELP)(serve)


def served_names(value: str | None) -> list[str]:
    """`--served-model-name a,b`: the names in order, without blanks or repeats; a usage error when empty."""
    if value is None:
        return []
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        common.fail_usage(f"--served-model-name {value!r} names no model")
    return names


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MINICPMO_API_KEY",
                                          help="Require Authorization: Bearer KEY on /v1 routes."),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", metavar="NAME[,NAME...]",
        help="The model names clients may send, comma-separated; the first is listed first (default: --model). "
             "The checkpoint's hub id is accepted too."),
    strict_model_names: bool = typer.Option(
        False, "--strict-model-names",
        help="404 for OpenAI's standard names (whisper-1, tts-1, gpt-4o, ...), which are accepted by default."),
    max_upload_mb: float = typer.Option(25.0, "--max-upload-mb", min=0.001, help="Largest request body."),
    max_queue: int = typer.Option(64, "--max-queue", min=1,
                                  help="Requests waiting at most; more get 429 with Retry-After."),
    max_batch: Optional[int] = typer.Option(
        None, "--max-batch", min=1,
        help="Requests running at once, decoded together (1: one at a time). Default: on CUDA what the KV cache "
             "budget holds at 8192 positions per request (at most 256), else 16."),
    kv_cache_gb: Optional[float] = typer.Option(
        None, "--kv-cache-gb", min=0.0001, metavar="GB",
        help="Memory the KV cache of running requests may take, in GiB; a request that cannot fit is refused "
             "before memory is taken. Default: on CUDA 80% of the memory free after loading, else no limit."),
    stall_timeout: float = typer.Option(
        60.0, "--stall-timeout", min=0.1, metavar="SECONDS",
        help="A streamed answer whose client stays connected but reads nothing this long is cancelled (its "
             "place freed)."),
    no_tts: bool = typer.Option(False, "--no-tts", help="Do not load the speech tower (no speech routes)."),
    no_url_fetch: bool = typer.Option(False, "--no-url-fetch", help="Refuse http(s) image/video URLs."),
    allow_private_urls: bool = typer.Option(
        False, "--allow-private-urls",
        help="Also fetch image/video URLs on loopback, private and link-local addresses (off: public only)."),
    url_timeout: float = typer.Option(10.0, "--url-timeout", min=0.1, max=600.0,
                                      help="Seconds a whole image/video URL fetch may take."),
) -> None:
    quiet_idle_threads()
    try:
        import uvicorn  # noqa: F401 - the serve extra is there

        from minicpmo_cli.server.app import create_app
        from minicpmo_cli.server.media import FetchLimits
        from minicpmo_cli.server.state import ServerState, Settings
    except ImportError as exc:
        from minicpmo_cli.errors import EnvironmentProblem

        raise EnvironmentProblem(f"serve needs the serve extra ({exc.name} is missing): "
                                 "pip install -e \".[serve]\"") from None
    limit = int(max_upload_mb * 1024 * 1024)
    from dataclasses import replace

    # the LLM engine's slots (one per running request) and their memory; None: from the free GPU memory
    load = replace(common.load_options(), max_batch=max_batch, kv_cache_gb=kv_cache_gb)
    names = served_names(served_model_name) or [common.options().model]
    settings = Settings(load=load, model_id=names[0], served_names=tuple(names[1:]),
                        strict_model_names=strict_model_names, api_key=api_key, max_upload_bytes=limit,
                        max_queue=max_queue, max_batch=max_batch, tts=not no_tts, seed=common.options().seed,
                        stall_s=stall_timeout,
                        fetch=FetchLimits(max_bytes=limit, allow_http=not no_url_fetch, timeout=url_timeout,
                                          allow_private=allow_private_urls))
    _run(create_app(ServerState(settings)), host, port, api_key)


# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The event loop, the
# request threads and the engine thread hand work to each other many times per request; at 5 ms a short
# request that arrives while long answers stream waits several such slices (measured: a 1-token request behind
# 15 streams took 28 ms at 5 ms, 20 ms at 0.5 ms, with the same throughput).
SWITCH_INTERVAL_S = 0.0005


def _run(app, host: str, port: int, api_key: str | None) -> None:
    import uvicorn

    if api_key is None and not _loopback(host):
        common.err(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
                    "model (requests must name this address or localhost as their Host; use --api-key KEY)")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    print(f"minicpmo: serving {app.state.minicpmo.settings.model_id} at {url} (web page: {url}/; GET /health says "
          "when it is ready)")
    print(f"export MINICPMO_SERVER={url}", flush=True)
    level = "warning" if common.options().quiet else "info"
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=host, port=port, log_level=level, timeout_graceful_shutdown=3)


def quiet_idle_threads() -> None:
    """OpenMP worker threads sleep as soon as they are idle instead of spinning (libgomp spins by default): a
    server runs the engine, the request threads and the event loop beside torch's intra-op threads, and spinning
    workers take the cores those need (measured on 2 busy CPU cores: a 1-token answer took 200 ms instead of 8).
    Read when torch loads, so only before that; an OMP_WAIT_POLICY already set is kept."""
    import os
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
