#!/usr/bin/env bash
# The GPU measurements behind bench/RESULTS.md's GPU section, in one run on one GPU node
# (written for one H200: ~6-7 minutes of work; no part starts after DEADLINE_S, each part is cut
# at its own limit, so a caller's 480 s timeout keeps the summary).
#
#   bash bench/device_check.sh                         # on the GPU node, from the project's root
#   DEVICE=cpu SMALL=1 bash bench/device_check.sh      # dry run on a CPU, tiny sizes (CI runs it)
#   PARTS="estep e2e" bash bench/device_check.sh       # a subset (a rerun of one part)
#
# Parts, in order of value (expected H200 wall seconds, Python start-up included):
#   env     ~15 s   versions, the GPU, bf16 / fp32 matmul and copy ceilings
#   step    ~45 s   bench_step.py --preset imagenet-100ep, 512 a GPU (4096 / 8): SiamMM step, bf16,
#                   channels_last, LARS, cluster term, EMA: images/s, FLOP, % of peak, memory
#   inst    ~40 s   the same with --cluster-weight 0, the instance-only step (paper: 1.54x an epoch)
#   estep   ~60 s   bench_cluster.py: the E-step search at N_local 160,146 x K 100,000 x D 256
#                   (faiss-gpu if there, else torch's exact search) against the CPU's; eq. 10's
#                   table; merging at K 100,000; a re-initialised vs warm-started fit
#   e2e     ~100 s  scikit-learn's digits as a folder; train.py --preset imagenet-100ep (ResNet-50,
#                   224 px) 1 epoch, stop, resume to epoch 2, evaluate.py: the whole path on --device
#   data    ~60 s   check_gpu_data.py: nvJPEG decode, device-side crops, feature pass bf16 vs fp32
#   fp16    ~40 s   bench_step.py --amp fp16: the GradScaler path
#   prof    ~30 s   bench_step.py --profile: where one SiamMM step's time goes (torch.profiler)
#   faiss   ~12 s   check_faiss_gpu.py (only where Faiss imports): torch's GPU search = CPU Faiss
# Faiss is optional (search.py): without it every search runs on torch. A carried faiss-cpu
# wheel in .whl/ is installed to $SITE first, so the E-step can be checked against CPU Faiss.
# Output under $OUT (7 files): device_check.log, status.txt (part rc seconds), figures.json,
# summary.md (also printed last), e2e_log.jsonl, e2e_results.json, profile.txt.
set -u
set -o pipefail
[ -f train.py ] && [ -f bench/bench_step.py ] || { echo "device_check.sh: run it from the project's root" >&2; exit 2; }
T0=$(date +%s)
OUT=${OUT:-/tmp/device_check_out}   # never inside the checkout
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
DEADLINE_S=${DEADLINE_S:-430}
PARTS=${PARTS:-env step inst estep e2e data fp16 prof faiss}
PY=${PY:-python3}
WORK=${WORK:-/tmp/device_check}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/device_check.log
STATUS=$OUT/status.txt
: > "$LOG"; : > "$STATUS"
rm -f "$WORK"/*.json
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1 DEVICE SMALL OUT WORK
log() { echo "$*" | tee -a "$LOG"; }

# part NAME LIMIT_S CMD...: run CMD if NAME is in PARTS and the deadline allows, cut at the
# smaller of LIMIT_S and the time left; its output goes to the log; status.txt gets NAME rc s.
part() {
  local name=$1 limit=$2 now left t rc
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  now=$(( $(date +%s) - T0 )); left=$(( DEADLINE_S - now ))
  if [ "$left" -lt 10 ]; then log "== $name: skipped, deadline (${now}s)"; echo "$name skipped 0" >> "$STATUS"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "== $name: $* (limit ${limit}s, at ${now}s)"
  t=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  log "== $name: rc $rc in $(( $(date +%s) - t ))s"
  echo "$name $rc $(( $(date +%s) - t ))" >> "$STATUS"
}

if ! $PY -c "import faiss" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
HAVE_FAISS=0; $PY -c "import faiss" 2>/dev/null && HAVE_FAISS=1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$LOG"

# ---- sizes: the real ones on the GPU; SMALL=1 shrinks everything for a CPU dry run
if [ "$SMALL" = 1 ]; then
  STEP_ARGS="--preset imagenet-100ep --batch-size 8 --feature-batch-size 8 --img-size 32 --steps 2 --device $DEVICE"
  CLUSTER_ARGS="--search-n 6000 --k 1500 --merge-k 3000 --n 6000 --nredo 1 --init-iters 2 --warm-iters 3 --repeats 1"
  E2E_ARGS="--img-size 32 --proj-hidden 64 --pred-hidden 64 --batch-size 32 --feature-batch-size 64 --num-clusters 20 --workers 1 --subset 128"
  EVAL_ARGS="--probe-epochs 5 --kmeans-redo 1 --workers 1 --grid-clusters 2"
  DATA_ARGS="--n 4 --batch 4 --size 64"
  FAISS_ARGS="--n 2000 --k 300"
else
  STEP_ARGS="--preset imagenet-100ep --batch-size 512 --device $DEVICE"   # 4096 / 8 GPUs
  CLUSTER_ARGS="--search-n 160146 --k 100000 --merge-k 100000 --n 160146 --nredo 1 --init-iters 1 --warm-iters 3 --repeats 2"
  E2E_ARGS="--batch-size 256 --num-clusters 200 --workers 8"
  EVAL_ARGS="--workers 8"
  DATA_ARGS="--n 512 --batch 512"
  FAISS_ARGS=""
fi

env_part() {
  $PY - <<'EOF'
import importlib, json, os, platform, time
import torch
dev, small = torch.device(os.environ["DEVICE"]), os.environ["SMALL"] == "1"
fig = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version()}
for m in ("torchvision", "numpy", "scipy", "sklearn", "PIL", "tqdm", "matplotlib", "faiss"):
    try:
        fig[m] = getattr(importlib.import_module(m), "__version__", "?")
    except ImportError as e:
        fig[m] = f"missing ({e})"
if dev.type == "cuda":
    p = torch.cuda.get_device_properties(dev)
    fig["gpu"] = f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}"
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def tflops(dtype, n, reps):   # random data (zeros run faster), 3 warm-ups, mean of reps
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


n = 512 if small else 8192
fig["bf16_tflops"] = tflops(torch.bfloat16, n, 20)
torch.backends.cuda.matmul.allow_tf32 = False   # search.torch_search's setting: plain fp32
fig["fp32_tflops"] = tflops(torch.float32, n, 10)
if dev.type == "cuda":
    x = torch.randn(2 ** 29, device=dev)   # 2 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    fig["copy_tb_per_s"] = 2 * x.numel() * 4 * 10 / (time.perf_counter() - t) / 1e12
print(json.dumps(fig, indent=1))
json.dump(fig, open(os.path.join(os.environ["WORK"], "env.json"), "w"))
EOF
}

# train.py twice (stop after epoch 1, then resume: the checkpoint and CUDA RNG path), evaluate.py
e2e_part() {
  local run=$WORK/run rc
  rm -rf "$run"
  [ -d "$WORK/digits/train" ] || $PY bench/fmnist_folder.py --digits --out "$WORK/digits" || return 1
  local args="--preset imagenet-100ep --data folder --data-dir $WORK/digits --epochs 2 --device $DEVICE --out-dir $run $E2E_ARGS"
  $PY train.py $args --stop-after-epoch 1 || return 1
  $PY train.py $args; rc=$?
  cp "$run/log.jsonl" "$OUT/e2e_log.jsonl" 2>/dev/null
  [ $rc = 0 ] || return $rc
  $PY evaluate.py --checkpoint "$run/checkpoint.pth" --device "$DEVICE" --out-dir "$run/eval" $EVAL_ARGS; rc=$?
  cp "$run/eval/results.json" "$OUT/e2e_results.json" 2>/dev/null
  return $rc
}
export -f env_part e2e_part
export PY E2E_ARGS EVAL_ARGS

part env   40  bash -c env_part
part step  90  $PY bench/bench_step.py $STEP_ARGS --json "$WORK/step.json"
part inst  75  $PY bench/bench_step.py $STEP_ARGS --cluster-weight 0 --json "$WORK/inst.json"
part estep 150 $PY bench/bench_cluster.py --device "$DEVICE" $CLUSTER_ARGS --json "$WORK/estep.json"
part e2e   180 bash -c e2e_part
part data  120 $PY bench/check_gpu_data.py --device "$DEVICE" $DATA_ARGS --json "$WORK/data.json"
part fp16  75  $PY bench/bench_step.py $STEP_ARGS --amp fp16 --json "$WORK/fp16.json"
part prof  60  $PY bench/bench_step.py $STEP_ARGS --steps 1 --profile "$OUT/profile.txt"
if [ "$HAVE_FAISS" = 1 ]; then
  part faiss 40 $PY bench/check_faiss_gpu.py --device "$DEVICE" $FAISS_ARGS
else
  log "== faiss: skipped (Faiss does not import here: carry a faiss-cpu wheel in .whl/)"
fi
log "== total $(( $(date +%s) - T0 ))s"

# ---- the summary: every figure from the parts' JSON files, and what follows from them
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os
work, out = os.environ["WORK"], os.environ["OUT"]
fig = {}
for name in ("env", "step", "inst", "estep", "data", "fp16"):
    try:
        fig[name] = json.load(open(os.path.join(work, name + ".json")))
    except (OSError, ValueError):
        pass
fig["parts"] = [line.split() for line in open(os.path.join(out, "status.txt")) if line.strip()]
json.dump(fig, open(os.path.join(out, "figures.json"), "w"), indent=1)
rows, env = [], fig.get("env", {})
rows.append(("device", env.get("gpu", os.environ["DEVICE"])))
rows.append(("torch, CUDA, cuDNN, faiss", f"{env.get('torch')}, {env.get('cuda')}, {env.get('cudnn')}, {env.get('faiss')}"))
if env:
    rows.append(("matmul bf16 / fp32, copy", f"{env['bf16_tflops']:.0f} / {env['fp32_tflops']:.1f} TFLOP/s, "
                                              f"{env.get('copy_tb_per_s', 0):.2f} TB/s"))
s, i, h = fig.get("step"), fig.get("inst"), fig.get("fp16")
for name, r in (("SiamMM step", s), ("instance-only step", i), ("SiamMM step, fp16 + GradScaler", h)):
    if r:
        share = f" = {100 * r['peak_share']:.1f}% of the bf16 peak" if r.get("peak_share") is not None else ""
        mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""
        rows.append((f"{name}, {r['arch']} {r['img_size']} px, batch {r['batch']}",
                     f"{r['step_images_per_s']:.0f} images/s, {r['flop_per_image'] / 1e9:.1f} GFLOP an image, "
                     f"{r['tflops']:.1f} TFLOP/s{share}{mem}"))
if s and i:
    rows.append(("SiamMM / instance-only step time", f"{i['step_images_per_s'] / s['step_images_per_s']:.3f}x (target <= 1.10)"))
if s:
    rows.append(("feature pass", f"{s['feature_images_per_s']:.0f} images/s"))
e = fig.get("estep", {})
if "search" in e:
    x = e["search"]
    rows.append((f"E-step search N {x['n']:,} x K {x['k']:,} x D {x['dim']} ({x['backend']})",
                 f"k=1 {x['search_k1_s']:.3f} s ({x['tflops']:.0f} TFLOP/s), k=3 {x['search_k3_s']:.3f} s, eq. 10 table "
                 f"{x['assignment_table_s']:.3f} s; same centroid as the CPU for {100 * x['agree_with_cpu']:.2f}% (target <= 0.4 s)"))
if "merge" in e:
    m = e["merge"]
    rows.append((f"merging at K {m['k']:,} on {m['device']} ({m['how']})",
                 ", ".join(f"{c['centroids']}: {c['best_s']:.2f} s, {c['merged']:,} merges" for c in m["cases"])
                 + " (target <= 1 s)"))
if "em" in e:
    m = e["em"]
    rows.append((f"fit N {m['n']:,} K {m['k']:,}: re-initialised vs warm-started",
                 f"{m['reinit_s']:.1f} s ({m['reinit_esteps']} E-steps) vs {m['warm_s']:.1f} s ({m['warm_esteps']})"))
if s and i and e.get("search"):
    n = 1281167 / 8
    t_tr, t_in, t_fp = n / s["step_images_per_s"], n / i["step_images_per_s"], n / s["feature_images_per_s"]
    t_e = e["search"]["assignment_table_s"] + 4 * e["search"]["search_k1_s"]
    rows.append(("ImageNet epoch a rank, no data loading", f"train {t_tr:.0f} s + feature pass {t_fp:.0f} s + E-step "
                 f"~{t_e:.1f} s = {(t_tr + t_fp + t_e) / t_in:.2f}x instance-only's {t_in:.0f} s (paper: 1.54x)"))
d = fig.get("data")
if d:
    rows += [(f"check_gpu_data: {k}", f"{v:,.0f} images/s") for k, v in d["images_per_s"].items()]
    rows.append(("feature pass bf16 vs fp32 cosine", f"mean {d['cosine_mean']:.5f}, min {d['cosine_min']:.5f} (target >= 0.999)"))
try:
    log = [json.loads(line) for line in open(os.path.join(out, "e2e_log.jsonl"))]
    rows.append(("e2e train.py (digits folder, imagenet-100ep preset)", "; ".join(
        f"epoch {r['epoch']}: K {r.get('K')}, loss {r['loss']:.3f}, {r['time']['epoch']:.0f} s" for r in log)))
    res = json.load(open(os.path.join(out, "e2e_results.json")))
    rows.append(("e2e evaluate.py", f"kNN top-1 {res['knn']['top1']}, on {res.get('device')}"))
except (OSError, ValueError, KeyError) as err:
    rows.append(("e2e", f"no results ({type(err).__name__})"))
rows.append(("parts (name rc seconds)", ", ".join(" ".join(p) for p in fig["parts"])))
md = "| what | measured |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
open(os.path.join(out, "summary.md"), "w").write(md + "\n")
print(md)
EOF
# rc: 0 only when every part that ran ended with rc 0
awk '$2 != 0 && $2 != "skipped" {bad = 1} END {exit bad}' "$STATUS"
