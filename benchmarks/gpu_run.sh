#!/usr/bin/env bash
# Everything a GPU session measures, as one command that keeps what it measured when it is cut short.
#
# On the GPU machine (python 3.12 with its own CUDA torch, no internet), from the repository root, with the
# wheel folder that benchmarks/fetch_gpu_wheels.sh fills here carried along (.gpu-wheels, about 26 MB):
#
#   bash benchmarks/gpu_run.sh                 # about 8 minutes at most (GPU_RUN_SECONDS, default 470)
#
# Parts, in this order, each under its own time limit (a part cut short keeps the rows it printed):
#   1. env.txt        torch, transformers, CUDA, cuDNN, the GPU
#   2. cli.md         the CLI on a tiny checkpoint on CUDA (benchmarks/gpu_cli_checks.py): one-shot chat
#                     start-up (-v phases, wall) with and without cuDNN attention and on the CPU; eager vs
#                     captured ids, seeded sampling twice, --quantize int8/int4, image, asr, tts
#   3. cuda_tests.txt the tests that need CUDA (pytest -k "cuda or graph"; the others skip or are deselected)
#   4. profile.md     one decode step of the full-size LLM under torch.profiler (benchmarks/gpu_profile.py)
#   5. tts_batch.md   TTS lines batched on the TTS engine vs one by one (benchmarks/tts_batch.py);
#      tts_stream.md  the same for streamed speech (--stream)
#   6. asr.md         asr at GPU speed (benchmarks/asr_gpu.py): 100 x 10 s real speech clips through the staged
#                     pipeline on the full-size model vs the one-by-one loop, 10 files of 10 minutes
#   7. vad.md         the batched VAD on cuda, 10 files of 10 min (benchmarks/gpu_vad.py): vs the CPU, together == alone
#   8. full_size.md   the full-size benchmark (benchmarks/gpu_full_size.py), its stages in child processes
#                     under their own limits, with whatever time is left; its "concurrent" stage is issue 21's
#                     GPU rows (aggregate decode of 32 requests at once, time-to-first-token p95 at 16 clients)
# GPU_RUN_PARTS=asr,full_size (names as in the [name] lines): only those parts (env always runs), so one session
# can spend its minutes on the open issues' rows, e.g. GPU_RUN_PARTS=asr,tts_batch,vad,full_size.
# Results go to $OUT when it is set (a folder the caller collects), else benchmarks/results/gpu-<time>/; run.log
# has every part's stderr. GPU_RUN_SMOKE=1: the same plumbing on the CPU at tiny sizes (no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${GPU_WHEELS:-.gpu-wheels}"
BUDGET="${GPU_RUN_SECONDS:-470}"
SMOKE="${GPU_RUN_SMOKE:-}"
RESULTS="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
SITE="${GPU_RUN_SITE:-/tmp/minicpmo-gpu-site}"
START=$SECONDS

if [ -z "${GPU_RUN_NO_INSTALL:-}" ]; then  # GPU_RUN_NO_INSTALL=1: the packages are here already
  if [ ! -d "$WHEELS" ] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS: run benchmarks/fetch_gpu_wheels.sh on a machine with internet first," \
         "and bring that folder along" >&2
    exit 4
  fi
  # --target: the machine's own packages stay untouched; --no-deps: torch and the rest are the machine's.
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl; then
    echo "error: the wheels in $WHEELS did not install" >&2
    exit 4
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$RESULTS"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NO_COLOR=1
LOG="$RESULTS/run.log"
: > "$LOG"

left() { echo $(( BUDGET - (SECONDS - START) )); }

part() {  # part NAME FILE SECONDS COMMAND...: run under a time limit, stdout to FILE (and the screen)
  local name="$1" file="$2" limit="$3"
  shift 3
  local remaining
  if [ -n "${GPU_RUN_PARTS:-}" ] && [ "$name" != env ] && [[ ",$GPU_RUN_PARTS," != *",$name,"* ]]; then
    echo "[$name] not run: not in GPU_RUN_PARTS" | tee -a "$LOG" >&2
    return
  fi
  remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "[$name] not run: the run's $BUDGET s are spent" | tee -a "$LOG" >&2
    return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "[$name] up to $limit s" | tee -a "$LOG" >&2
  local began=$SECONDS
  timeout -k 5 "$limit" "$@" > >(tee "$RESULTS/$file") 2> >(tee -a "$LOG" >&2)
  local code=$?
  sleep 0.2  # let the tees finish their writes
  echo "[$name] exit $code after $(( SECONDS - began )) s$([ $code -eq 124 ] && echo ' (time limit: rows so far kept)')" \
    | tee -a "$LOG" >&2
}

part env env.txt 30 python3 - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__, "from", transformers.__file__)
print("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, f"{props.total_memory / 2**30:.0f} GiB", f"sm {props.major}.{props.minor}")
PY

if [ -n "$SMOKE" ]; then
  part cli cli.md 300 python3 benchmarks/gpu_cli_checks.py --device cpu
  part profile profile.md 120 python3 benchmarks/gpu_profile.py --cpu-smoke
  part tts_batch tts_batch.md 60 python3 benchmarks/tts_batch.py --lines 4 --slots 4 --frames 20
  part asr asr.md 120 python3 benchmarks/asr_gpu.py --cpu-smoke
  part full_size full_size.md "$(left)" python3 benchmarks/gpu_full_size.py --cpu-smoke --skip asr,memory \
    --quantize int4 --time-limit $(( $(left) - 15 ))
else
  part cli cli.md 130 python3 benchmarks/gpu_cli_checks.py
  # The tests that run only where CUDA is (graph == eager bit for bit, start_device, ...); the others skip.
  part cuda_tests cuda_tests.txt 60 python3 -m pytest -q -rs -n 4 -p no:cacheprovider --continue-on-collection-errors \
    -k "cuda or graph" tests/model tests/unit
  part profile profile.md 80 python3 benchmarks/gpu_profile.py --steps 16
  # TTS lines batched on the TTS engine vs one by one, the official TTS shape, captured steps for both
  part tts_batch tts_batch.md 60 python3 benchmarks/tts_batch.py --device cuda --full-size --step graph \
    --lines 12 --slots 8 --frames 80
  part tts_stream tts_stream.md 60 python3 benchmarks/tts_batch.py --stream --device cuda --full-size --step graph \
    --lines 12 --slots 8 --frames 80
  part asr asr.md 150 python3 benchmarks/asr_gpu.py --stage-timeout 90 --time-limit 140
  part vad vad.md 45 python3 benchmarks/gpu_vad.py --files 10 --minutes 10
  part full_size full_size.md "$(left)" python3 benchmarks/gpu_full_size.py --repeats 2 \
    --timeouts build=90,vision=30,audio=30,decode=60,prefill=30,asr=60,tts=60,memory=60,quant-int8=90,quant-int4=90 \
    --time-limit $(( $(left) - 15 ))
fi
echo "done in $(( SECONDS - START )) s; results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')" | tee -a "$LOG" >&2
