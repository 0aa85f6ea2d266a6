#!/usr/bin/env bash
# The one GPU proof of accelctl: run from the project's root on a GPU machine (no network needed).
#
#   bash scripts/gpu_check.sh OUT_DIR          # on the GPU (about 8 minutes on one H100/H200)
#   bash scripts/gpu_check.sh OUT_DIR --cpu    # the same steps on the CPU with tiny sizes
#
# Steps (each with a timeout; the first that fails stops the script with a non-zero exit and
# names itself; its log is in OUT_DIR/logs/):
#   env          accelctl env (text and --json): plugin, CUDA/cuDNN/NCCL, devices; a GPU is visible
#   pytest_gpu   pytest -m gpu tests/test_gpu.py: bf16 GEMMs, cuDNN attention vs XLA, memory stats,
#                the data cache in HBM, a real GPU trace parsed (none may be skipped on a GPU)
#   bench_suite  accelctl bench, fp32 and bf16, MFU, a profile of each row's bare-step window
#   plan_gpt     accelctl plan gpt_small: the batch it picks (the config's if it fits, else the
#                suggestion's), then plans of remat none and dots at that batch
#   bench_gpt_*  gpt_small bf16 at that batch, remat none / dots: tokens/s, MFU, peak memory
#   train_profile  accelctl train --profile on a small GPT: the loop's profile hook on the device
#   compare      accelctl compare-devices on the default workload
#   torch        scripts/bench_torch.py --device cuda beside accelctl's numbers
#   oom          a run that cannot fit (gpt_small at batch 8192) stops cleanly: exit 5, no traceback
#   report       checks every result file and prints the tables (also OUT_DIR/report.md)
#
# accelctl runs from this checkout (python3 -m accelctl). On a machine whose image lacks some of
# accelctl's dependencies, put their wheels in .whl/ (docs/benchmarks/gpu/README.md): they are
# installed into /tmp/site first. PYTHON picks the interpreter (default python3).
set -euo pipefail

usage() {
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--cpu]" >&2
  exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
MODE=gpu
if [[ $# -eq 2 ]]; then
  [[ $2 == --cpu ]] || usage
  MODE=cpu
fi
[[ -f pyproject.toml && -d accelctl ]] || {
  echo "gpu_check: run it from the project's root" >&2
  exit 2
}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" "$OUT/configs"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.tsv"
export PYTHONUNBUFFERED=1

if [[ $MODE == gpu ]]; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -gt 0 ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" ||
      {
        echo "gpu_check: FAILED at step 'wheels': pip could not install .whl/*.whl" >&2
        exit 1
      }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  # The CPU backend with no preset device count: the dry run sees what a user's CPU run sees.
  export JAX_PLATFORMS=cpu
  unset XLA_FLAGS JAX_NUM_CPU_DEVICES
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
ACCELCTL=("$PY" -m accelctl)

fail() {
  echo "gpu_check: FAILED at step '$1': $2" >&2
  exit 1
}

# step NAME TIMEOUT_S EXPECTED_EXIT CMD...: run CMD with a timeout, its output in logs/NAME.log.
step() {
  local name=$1 limit=$2 want=$3
  shift 3
  local log="$OUT/logs/$name.log" t0=$SECONDS rc=0
  echo "gpu_check: [$name] $*" >&2
  timeout --kill-after=20 "$limit" "$@" >"$log" 2>&1 || rc=$?
  local took=$((SECONDS - t0))
  if [[ $rc -ne $want ]]; then
    printf '%s\tFAILED (exit %s)\t%ss\n' "$name" "$rc" "$took" >>"$OUT/steps.tsv"
    tail -n 30 "$log" >&2 || true
    local why="exit $rc, expected $want"
    [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit}s"
    fail "$name" "$why; log: $log"
  fi
  printf '%s\tok\t%ss\n' "$name" "$took" >>"$OUT/steps.tsv"
}

# check NAME PYTHON_CODE: a check on the result files (argv: OUT MODE); failure stops the script.
check() {
  local name=$1 code=$2
  "$PY" -c "$code" "$OUT" "$MODE" >>"$OUT/logs/$name.log" 2>&1 ||
    fail "$name" "$(tail -n 1 "$OUT/logs/$name.log")"
}

# ------------------------------------------------------------------------------ the workloads
if [[ $MODE == gpu ]]; then
  SUITE=()
  SIZES=(--steps 20 --warmup 3)
  GPT=gpt_small
  SMALL_GPT=gpt_tiny
  COMPARE=(--steps 10 --warmup 2)
  TORCH=(--device cuda --matmul-precision high --steps 20 --warmup 5)
  OOM=(gpt_small --set train.batch_size=8192 --set train.steps=2)
else
  cat >"$OUT/configs/mnist_mlp.yaml" <<'YAML'
model: {name: mlp, hidden: [32]}
data: {source: synthetic, shape: [8, 8, 1], num_train: 512, num_eval: 64, num_classes: 10}
optimizer: {name: adam, lr: 0.001}
train: {batch_size: 32, steps: 10}
YAML
  cat >"$OUT/configs/mnist_cnn.yaml" <<'YAML'
model: {name: cnn, channels: [4, 8], dense: [16]}
data: {source: synthetic, shape: [8, 8, 1], num_train: 512, num_eval: 64, num_classes: 10}
optimizer: {name: adam, lr: 0.001}
train: {batch_size: 32, steps: 10}
YAML
  cat >"$OUT/configs/gpt.yaml" <<'YAML'
model: {name: transformer, num_layers: 1, num_heads: 2, embed_dim: 32, max_len: 32}
data: {source: tokens, kind: synthetic, seq_len: 32, vocab_size: 64, num_train: 256,
       num_eval: 32}
optimizer: {name: adamw, lr: 0.003}
train: {batch_size: 16, steps: 10, log_every: 2}
precision: {compute: bf16}
YAML
  # A train state of 447 GiB: refused before anything is allocated, like an oversized batch on
  # a GPU (an oversized batch on the CPU would only be refused against the host's memory).
  cat >"$OUT/configs/huge.yaml" <<'YAML'
model: {name: mlp, hidden: [200000, 200000]}
data: {source: synthetic, shape: [8, 8, 1], num_train: 256, num_eval: 64, num_classes: 4}
optimizer: {name: adam, lr: 0.001}
train: {batch_size: 32, steps: 2}
YAML
  SUITE=("$OUT/configs/mnist_mlp.yaml" "$OUT/configs/mnist_cnn.yaml")
  SIZES=(--steps 3 --warmup 1)
  GPT="$OUT/configs/gpt.yaml"
  SMALL_GPT="$OUT/configs/gpt.yaml"
  COMPARE=("$OUT/configs/mnist_cnn.yaml" --cpu-devices 2 --steps 3 --warmup 1)
  TORCH=(--device cpu --workloads mnist_mlp mnist_cnn --modes eager --steps 3 --warmup 1)
  OOM=("$OUT/configs/huge.yaml" --set train.steps=2)
fi

# --------------------------------------------------------------------------------- the steps
step env 180 0 "${ACCELCTL[@]}" env
cp "$OUT/logs/env.log" "$OUT/env.txt"
step env_json 180 0 "${ACCELCTL[@]}" env --json "$OUT/env.json"
check env_json '
import json, sys
out, mode = sys.argv[1:3]
r = json.load(open(f"{out}/env.json"))
want, have = ("gpu" if mode == "gpu" else "cpu"), r["default_backend"]
if have != want:
    sys.exit(f"the default backend is {have}, not {want}: " + "; ".join(r["warnings"]))
if mode == "gpu" and not r.get("cuda_plugin"):
    sys.exit("no CUDA plugin loads")
'

step pytest_gpu 600 0 env ACCELCTL_GPU_TESTS=1 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  -rs tests/test_gpu.py --junitxml "$OUT/pytest_gpu.xml"
check pytest_gpu '
import sys, xml.etree.ElementTree as ET
out, mode = sys.argv[1:3]
s = ET.parse(f"{out}/pytest_gpu.xml").getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
n, skipped = int(s.get("tests")), int(s.get("skipped"))
bad = int(s.get("failures")) + int(s.get("errors"))
if n < 5 or bad:
    sys.exit(f"{n} GPU tests collected, {bad} failed")
if mode == "gpu" and skipped:
    sys.exit(f"{skipped} of {n} GPU tests were skipped on the GPU (see the log)")
if mode == "cpu" and skipped != n:
    sys.exit(f"on the CPU every GPU test must skip; {n - skipped} ran")
'

step bench_suite 900 0 "${ACCELCTL[@]}" bench "${SUITE[@]}" --precision fp32 --precision bf16 \
  "${SIZES[@]}" --profile "$OUT/profile_bench" --json "$OUT/bench_suite.json"

# gpt_small: the batch the plan picks, then remat none and dots at that batch.
for remat in none dots; do
  "$PY" -c 'import sys; from accelctl import config
sys.stdout.write(config.load(sys.argv[1], [f"model.remat={sys.argv[2]}"]).to_yaml())' \
    "$GPT" "$remat" >"$OUT/configs/gpt_remat_$remat.yaml" ||
    fail plan_gpt "cannot write the remat $remat config"
done
step plan_gpt 300 0 "${ACCELCTL[@]}" plan "$OUT/configs/gpt_remat_none.yaml" \
  --json "$OUT/plan_gpt.json"
read -r PLANNED BATCH < <("$PY" -c '
import json, sys
p = json.load(open(sys.argv[1]))
change = (p.get("suggestion") or {}).get("change") or {}
print(p["batch_size"], change.get("train.batch_size", p["batch_size"]) if p["fits"] is False
      else p["batch_size"])
' "$OUT/plan_gpt.json") || fail plan_gpt "cannot read $OUT/plan_gpt.json"
echo "$BATCH" >"$OUT/gpt_batch.txt"
for remat in none dots; do
  if [[ $remat == none && $BATCH == "$PLANNED" ]]; then
    cp "$OUT/plan_gpt.json" "$OUT/plan_gpt_none.json"  # the plan of that very batch
  else
    step "plan_gpt_$remat" 300 0 "${ACCELCTL[@]}" plan "$OUT/configs/gpt_remat_$remat.yaml" \
      --batch-size "$BATCH" --json "$OUT/plan_gpt_$remat.json"
  fi
  step "bench_gpt_$remat" 420 0 "${ACCELCTL[@]}" bench "$OUT/configs/gpt_remat_$remat.yaml" \
    --precision bf16 --batch-size "$BATCH" "${SIZES[@]}" --json "$OUT/bench_gpt_$remat.json"
done

step train_profile 300 0 "${ACCELCTL[@]}" train "$SMALL_GPT" --set train.steps=12 \
  --set checkpoint.enabled=false --profile 5:5 --run-dir "$OUT/train_profile" \
  --json "$OUT/train_profile.json"

step compare 600 0 "${ACCELCTL[@]}" compare-devices "${COMPARE[@]}" --json "$OUT/compare.json"

if [[ $MODE == cpu ]] && ! "$PY" -c "import torch" 2>/dev/null; then
  printf '%s\tskipped (no PyTorch here)\t0s\n' torch >>"$OUT/steps.tsv"
else
  step torch 420 0 "$PY" scripts/bench_torch.py "${TORCH[@]}" --json "$OUT/torch.json" \
    --accelctl "$OUT/bench_suite.json" --out "$OUT/torch_vs_accelctl.md"
fi

step oom 420 5 "${ACCELCTL[@]}" train "${OOM[@]}" --quiet --run-dir "$OUT/oom_run"
check oom '
import sys
out = sys.argv[1]
log = open(f"{out}/logs/oom.log").read()
if "Traceback" in log or "memory" not in log:
    sys.exit("the out-of-memory error is not a clean message: " + log[-500:])
'

# -------------------------------------------------------------------------------- the report
read -r -d '' REPORT <<'PY' || true
import json, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
gpu = mode == "gpu"
problems, lines = [], []


def load(name):
    return json.loads((out / name).read_text())


def mb(n):
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def ms(s):
    return "n/a" if s is None else f"{s * 1e3:.2f} ms"


def pct(x):
    return "n/a" if x is None else f"{x:.1%}"


env = load("env.json")
c = env.get("cuda") or {}
dev = env["backends"].get(env["default_backend"], {})
lines += [
    f"device: {dev.get('devices')} x {dev.get('kind')} ({env['default_backend']}); "
    f"jax {env['packages'].get('jax')}; plugin {c.get('plugin')} {c.get('plugin_version') or ''}; "
    f"CUDA {c.get('cuda')}, cuDNN {c.get('cudnn')}, NCCL {c.get('nccl')}",
    "",
    "| workload | dtype | batch | samples/s | tokens/s | step ms | MFU | attention | top device op |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
platform = "gpu" if gpu else "cpu"
suite = load("bench_suite.json")["results"]
gpt = {remat: load(f"bench_gpt_{remat}.json")["results"][0] for remat in ("none", "dots")}
rows = [(f"{r['workload']}", r) for r in suite]
rows += [(r["workload"], r) for r in gpt.values()]
for name, r in rows:
    what = f"{name} {r['precision']}"
    if r["platform"] != platform:
        problems.append(f"{what} ran on {r['platform']}, not {platform}")
    if gpu and r["mfu"] is None:
        problems.append(f"{what}: no MFU (no peak known for {r['device_kind']})")
    p, top = r.get("profile"), "-"
    if p is not None and not p["top_ops"]:
        problems.append(f"{what}: the profile holds no device ops ({p['error']})")
    elif p is not None:
        top = f"{p['top_ops'][0]['name'][:40]} {p['top_ops'][0]['share']:.0%}"
    tokens = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
    lines.append(
        f"| {name} | {r['precision']} | {r['batch_size']} | {r['samples_per_s']:,.0f} | "
        f"{tokens} | {r['step_time_s']['median'] * 1e3:.2f} | {pct(r['mfu'])} | "
        f"{r['attention_kernel'] or '-'} | {top} |"
    )

lines += [
    "",
    f"How good is the plan? gpt bf16, batch {gpt['none']['batch_size']} (predicted: `accelctl plan`;"
    " measured: `accelctl bench` alone in its process)",
    "",
    "| remat | predicted bytes | measured peak | measured / predicted | roofline step | measured step | measured / roofline |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]
for remat, r in gpt.items():
    plan = load(f"plan_gpt_{remat}.json")
    need, peak = plan["memory"]["need_bytes"], r["memory"].get("peak_bytes_in_use")
    roof, step = plan["roofline"]["step_time_s"], r["step_time_s"]["median"]
    if gpu and (peak is None or roof is None):
        problems.append(f"gpt remat {remat}: no measured peak or no roofline on the GPU")
    lines.append(
        f"| {remat} | {mb(need)} | {mb(peak)} | {f'{peak / need:.2f}' if peak and need else 'n/a'} | "
        f"{ms(roof)} | {ms(step)} | {f'{step / roof:.2f}' if roof else 'n/a'} |"
    )

tp = load("train_profile.json")["profile"]
if not tp or not tp["top_ops"]:
    problems.append(f"train --profile: no device ops in the trace ({tp and tp['error']})")
else:
    t = tp["top_ops"][0]
    lines += [
        "",
        f"train --profile {tp['steps'][0]}:{tp['steps'][1] - tp['steps'][0] + 1}: "
        f"{tp['device_ms']:.1f} ms of device ops ({tp['source']}), top {t['name']} "
        f"{t['share']:.0%}, input wait {pct(tp['input_wait_fraction'])}",
    ]

cmp = load("compare.json")
lines += ["", "| compare-devices set | samples/s | vs CPU x1 |", "| --- | --- | --- |"]
for r in cmp["rows"]:
    label = f"{r['platform']} x{r['devices']} {r['strategy']}"
    if r["error"]:
        lines.append(f"| {label} | failed: {r['error'][:60]} | - |")
        if r["platform"] == platform:
            problems.append(f"compare-devices {label} failed: {r['error']}")
    else:
        ratio = f"{r['speedup_vs_cpu']:.2f}x" if r["speedup_vs_cpu"] else "-"
        lines.append(f"| {label} | {r['samples_per_s']:,.0f} | {ratio} |")
if gpu and not any(r["platform"] == "gpu" and not r["error"] for r in cmp["rows"]):
    problems.append("compare-devices measured no GPU set")

if (out / "torch.json").exists():
    t = load("torch.json")
    lines += ["", f"PyTorch {t['torch']} on {t['device_name']} (matmul {t['matmul_precision']}):"]
    ours = {r["workload"]: r for r in suite if r["precision"] == "fp32"}
    for r in t["results"]:
        a = ours.get(r["workload"], {}).get("samples_per_s")
        if "error" in r:
            lines.append(f"  {r['workload']} {r['mode']}: failed ({r['error'][:80]})")
        else:
            vs = f", accelctl fp32 {a / r['samples_per_s']:.2f}x" if a else ""
            lines.append(f"  {r['workload']} {r['mode']}: {r['samples_per_s']:,.0f} samples/s{vs}")

oom = (out / "logs" / "oom.log").read_text().strip().splitlines()
lines += ["", f"out of memory (exit 5): {oom[-1][:160] if oom else ''}"]

lines += ["", "| step | status | time |", "| --- | --- | --- |"]
for row in (out / "steps.tsv").read_text().splitlines():
    lines.append("| " + " | ".join(row.split("\t")) + " |")
text = "\n".join(lines) + "\n"
(out / "report.md").write_text(f"# accelctl GPU check ({mode})\n\n" + text)
print(text)
if problems:
    print("PROBLEMS:\n  " + "\n  ".join(problems))
    sys.exit(1)
PY
"$PY" -c "$REPORT" "$OUT" "$MODE" >"$OUT/logs/report.log" 2>&1 || {
  cat "$OUT/logs/report.log" >&2
  fail report "the results do not hold what they must (above); log: $OUT/logs/report.log"
}
cat "$OUT/logs/report.log"
echo "gpu_check: all steps passed ($MODE); results in $OUT"
