#!/usr/bin/env bash
# Every GPU item of the benchmarks in one go (bench/gpu.py says which), one JSON out; under 8 minutes on one
# H100/H200, with random-init real-size models (a lent device has no weights and no network).
#
#   bash bench/gpu.sh --prepare     # HERE, before the device: fills .gpu-carry/ (git-ignored, about 50 MB):
#                                   #   data/mmla      the MMLA TSVs (from ../shared/data/mmla or $MMLA_DATA)
#                                   #   data/videos    the three real clips (../shared/data/videos)
#                                   #   cache/models/smollm2-135m   SmolLM2's tokenizer and config, no weights
#                                   #   wheels/        what the device image lacks or has in another version:
#                                   #                  av (PyAV, the video decoder) and this checkout's transformers
#   bash bench/gpu.sh               # ON THE DEVICE, carrying .gpu-carry:
#                                   #   run(command="bash bench/gpu.sh", carry=[".gpu-carry"], timeout_s=600)
#                                   # writes $OUT/gpu.json (or --out FILE); also prints the summary
#   bash bench/gpu.sh --dry-run     # CPU, tiny models, a few rows, the same items and JSON (the test suite runs
#                                   # it: tests/test_gpu_bench.py), so the script cannot rot between devices
# Other arguments go to bench/gpu.py (--only e2e,video; --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.gpu-carry
SHARED=../shared/data

if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf "$CARRY" && mkdir -p "$CARRY/data" "$CARRY/cache/models/smollm2-135m" "$CARRY/wheels"
    cp -r "${MMLA_DATA:-$SHARED/mmla}" "$CARRY/data/mmla"
    cp -r "$SHARED/videos" "$CARRY/data/videos"
    tok=$(PYTHONPATH=src $PY -c "from mmla.models import resolve; print(resolve('smollm2-135m'))")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja \
             special_tokens_map.json; do
        [[ -f "$tok/$f" ]] && cp "$tok/$f" "$CARRY/cache/models/smollm2-135m/"
    done
    tf=$($PY -c "import transformers; print(transformers.__version__)")
    av=$($PY -c "import av; print(av.__version__)")
    $PY -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" "transformers==$tf"
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" "av==$av"
    du -sh "$CARRY"
    echo "carry: [\"$CARRY\"]   command: bash bench/gpu.sh"
    exit 0
fi

if [[ "${1:-}" == "--dry-run" ]]; then
    export CUDA_VISIBLE_DEVICES=""  # the tiny shapes on the CPU even where a GPU is
    exec env PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu.py "$@"
fi

# on the device
if [[ -d "$CARRY" ]]; then
    if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mmla-site \
            "$CARRY"/wheels/*.whl
        export PYTHONPATH="/tmp/mmla-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export MMLA_CACHE="$PWD/$CARRY/cache" MMLA_DATA="$PWD/$CARRY/data/mmla"
    set -- --videos "$PWD/$CARRY/data/videos" "$@"
elif [[ ! -d "$SHARED/mmla" && -z "${MMLA_DATA:-}" ]]; then
    echo "bench/gpu.sh: no data here: run 'bash bench/gpu.sh --prepare' before, and carry $CARRY" >&2
    exit 2
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
has_out=0
for a in "$@"; do [[ "$a" == "--out" ]] && has_out=1; done
if [[ $has_out == 0 ]]; then set -- "$@" --out "${OUT:-.}/gpu.json"; fi
exec "$PY" bench/gpu.py "$@"
