"""SiamMM beside its baselines and its own ablations, at one budget, in one run.

Every variant is trained by train.py and evaluated by evaluate.py, run as the real programs
(subprocesses, one log file each), with the same flags except the one the variant changes.
The raw-pixel baseline comes from the same evaluation run as the default model.

    python bench/bench_quality.py                     # SiamMM vs instance-only vs raw pixels
    python bench/bench_quality.py --suite ablations   # Tables 5-7: soft/hard, merged/fixed K,
                                                      #   warm/re-initialised centroids, kappa
    python bench/bench_quality.py --suite k0          # K per epoch from several K0 (Fig. 2)
    python bench/bench_quality.py --suite all
    python bench/bench_quality.py -- --epochs 8       # flags after -- go to every train.py run

A finished run is reused (train.py --resume auto, and an existing eval/results.json), so an
interrupted bench continues where it stopped; --fresh starts over. Output in --out-dir:
results.md (the table, also printed), results.json, k_per_epoch.png, one folder per run.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import report  # noqa: E402  (Fig. 2's plot)

# name -> the train.py flags that make the variant (everything else is the preset's default)
DEFAULT = ("SiamMM (default)", [])
SUITES = {
    "main": [DEFAULT,
             ("instance-only (--cluster-weight 0)", ["--cluster-weight", "0"])],
    "ablations": [DEFAULT,
                  ("hard assignment, s = 1 (Table 6)", ["--soft-k", "1"]),
                  ("fixed K, no merging (Table 5)", ["--no-merge"]),
                  ("re-initialised centroids (Table 7)", ["--reinit-centroids"]),
                  ("constant kappa (Table 7)", ["--kappa-estimator", "const"])],
    "k0": [(f"K0 = {k}", ["--num-clusters", str(k)]) for k in (100, 1000)] + [DEFAULT],
}


def slug(flags):
    return "default" if not flags else "_".join(f.lstrip("-") for f in flags).replace("/", "-")


def run(cmd, log_path):
    """Run one program, its output to a log file; stop the bench with the log's tail if it fails."""
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        tail = open(log_path).read().strip().splitlines()[-1:] or ["(empty log)"]
        sys.exit(f"bench_quality.py: error: {' '.join(cmd[1:3])} failed (exit {rc}): {tail[0]} -- see {log_path}")


def f3(x):
    return "-" if x is None else f"{x:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="main", choices=sorted(SUITES) + ["all"])
    p.add_argument("--out-dir", default="runs/bench", help="one folder per variant, and the tables")
    p.add_argument("--eval-args", default="",
                   help="extra evaluate.py flags, e.g. '--train-subset 10000 --test-subset 5000 --probe-epochs 0' "
                        "(default: the full protocol, 60k train -> 10k test)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs of these variants first")
    args, train_extra = p.parse_known_args()
    if train_extra and train_extra[0] == "--":
        train_extra = train_extra[1:]
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    variants = list(dict((slug(fl), (name, fl)) for s in suites for name, fl in SUITES[s]).items())
    os.makedirs(args.out_dir, exist_ok=True)

    rows = []
    bar = tqdm(variants, desc="variants")
    for key, (name, flags) in bar:
        bar.set_postfix_str(name)
        d = os.path.join(args.out_dir, key)
        if args.fresh and os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d, exist_ok=True)
        t0 = time.time()
        run([sys.executable, "train.py", "--out-dir", d, "--resume", "auto", *train_extra, *flags],
            os.path.join(d, "train.log"))
        t_train = time.time() - t0
        res_path = os.path.join(d, "eval", "results.json")
        if not os.path.exists(res_path):
            # the default run also evaluates raw pixels: the baseline row, from the same run
            raw = [] if not flags else ["--no-raw"]
            run([sys.executable, "evaluate.py", "--checkpoint", os.path.join(d, "checkpoint.pth"),
                 "--out-dir", os.path.join(d, "eval"), *raw, *args.eval_args.split()], os.path.join(d, "eval.log"))
        res = json.load(open(res_path))
        log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
        rows.append(dict(name=name, flags=flags, dir=d, res=res, log=log, wall_s=t_train))

    # ---- the table
    def epoch_s(r):   # mean seconds per epoch: feature pass + clustering + training + merging
        return sum(e["time"]["epoch"] for e in r["log"]) / len(r["log"])

    def cost(r):
        """Mean over epochs of (feature pass + clustering + training + merging + bank) / training,
        from each epoch's own time split. An instance-only epoch is its training part alone, so
        this is the paper's "SiamMM epoch / instance-only epoch" (1.54x), measured inside one
        run: a host whose speed drifts between two runs cannot distort it."""
        return sum(sum(v for k, v in e["time"].items() if k != "epoch") / e["time"]["training"]
                   for e in r["log"]) / len(r["log"])
    lines = ["| variant | kNN top-1 | linear probe | k-means ACC | k-means NMI | k-means AMI | K (learned) "
             "| learned AMI | learned majority ACC | s / epoch | epoch / training |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        res, km, lc = r["res"], r["res"]["kmeans"], r["res"].get("learned_clusters") or {}
        probe = (res.get("linear_probe") or {}).get("top1")
        lines.append(f"| {r['name']} | {f3(res['knn']['top1'].get('20'))} | {f3(probe)} | {f3(km['hungarian_acc'])} "
                     f"| {f3(km['nmi'])} | {f3(km['ami'])} | {lc.get('K_mixture', '-')} | {f3(lc.get('ami'))} "
                     f"| {f3(lc.get('majority_acc'))} | {epoch_s(r):.0f} | {cost(r):.2f}x |")
    raw = next((r["res"]["raw_pixels"] for r in rows if not r["flags"] and r["res"].get("raw_pixels")), None)
    if raw:
        rk = raw["kmeans"]
        lines.append(f"| raw pixels (same evaluation run) | {f3(raw['knn_top1'].get('20'))} | - | "
                     f"{f3(rk['hungarian_acc'])} | {f3(rk['nmi'])} | {f3(rk['ami'])} | - | - | - | - | - |")
    notes = ["epoch / training: each epoch's (feature pass + clustering + training + merging + bank) / "
             "training, averaged over epochs = a SiamMM epoch / an instance-only epoch (paper: 1.54x; "
             "target: at most 1.10x)"]
    for r in rows:
        if any(e.get("K") for e in r["log"]):
            notes.append(f"K per epoch, {r['name']}: " + " -> ".join(str(e["K"]) for e in r["log"] if "K" in e))
    split = rows[0]["res"]["split"]
    head = (f"train.py {' '.join(train_extra) or '(preset defaults)'}; evaluate.py {args.eval_args or '(full protocol)'}; "
            f"train {split['train']} -> test {split['test']}")
    text = "\n".join([head, ""] + lines + [""] + notes)
    print(text)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)

    # ---- Fig. 2: K per epoch for every run with a mixture
    curves = {}
    for r in rows:
        ks = [(e["epoch"], e["K"]) for e in r["log"] if "K" in e]
        if ks and "--no-merge" not in r["flags"]:
            k0 = json.load(open(os.path.join(r["dir"], "args.json")))["num_clusters"]
            curves[r["name"]] = ([0] + [e for e, _ in ks], [k0] + [k for _, k in ks])
    report.plot_k_history(curves, os.path.join(args.out_dir, "k_per_epoch.png"), num_classes=10)
    print(f"table: {os.path.join(args.out_dir, 'results.md')} | plot: {os.path.join(args.out_dir, 'k_per_epoch.png')}")


if __name__ == "__main__":
    main()
