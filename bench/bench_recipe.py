"""The search for the CPU recipe: a grid of flag sets x data sets x seeds, each cell one
`train.py` run and one `evaluate.py` run (the real programs, the demo's own protocol),
summarised as mean +- std over seeds beside the raw-pixel floor of the same evaluation.

    python bench/bench_recipe.py --mode screen --settings default,shapes --sets fmnist,digits
    python bench/bench_recipe.py --mode confirm --settings shapes --sets fmnist,digits,fm5,fm7
    python bench/bench_recipe.py --list          # the settings and data sets it knows

screen:  one seed (0), a third of each setting's epochs, evaluate.py without the probe;
confirm: seeds 0, 1, 2, the full budget, evaluate.py exactly as `make demo` runs it.
(--seeds and --budget override either; --budget 2 --mode confirm is the budget curve's 2x,
its cells named confirm-x2.) Every cell lives in OUT/SET/SETTING/MODE-seedS and
is skipped once its cell.json exists, so a grid stopped anywhere continues where it was
(train.py resumes its own run), and a later call with more settings adds to the same table.

The data sets, all evaluated train split -> val split (C classes):
    fmnist  Fashion-MNIST's idx files (C = 10), the demo's data     tuned on
    digits  scikit-learn's 8 x 8 digits, a class-sorted folder (10) tuned on
    fm5     Fashion-MNIST classes 0-4, a class-sorted folder (5)    kept for confirmation
    fm7     Fashion-MNIST classes 3-9, a class-sorted folder (7)    kept for confirmation
The folders are written once under OUT/data (bench/fmnist_folder.py's writers).

Output in OUT: grid.csv (one row per cell), grid.md (mean +- std per setting and data set,
the raw-pixel floor, seconds per run), both rewritten from every finished cell.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import fmnist_folder  # noqa: E402

DEFAULT_EPOCHS = 48   # the cpu preset's (train.PRESETS["cpu"]["epochs"]); screening runs a fraction

# name -> train.py flags on top of the cpu preset. Generic: no setting knows its data set.
SETTINGS = {
    "default": [],
    "instance-only": ["--cluster-weight", "0"],
    "shapes": ["--aug", "shapes", "--hflip", "0"],
    "shapes-flip": ["--aug", "shapes", "--hflip", "0.5"],
    "shapes-crop.5": ["--aug", "shapes", "--hflip", "0", "--crop-min", "0.5"],
    "shapes-rot0": ["--aug", "shapes", "--hflip", "0", "--rotate", "0"],
    "lr.12": ["--lr", "0.12"],
    "m.96": ["--ema-momentum", "0.96"],
    "20kx12": ["--subset", "20000", "--epochs", "12"],
    "28px": ["--img-size", "28"],
    "cw.5": ["--cluster-weight", "0.5"],
    "tau.2": ["--tau", "0.2"],
    # the paper's ablations, each one flag of train.py: Table 5 (K fixed at K0), Table 6 (hard
    # assignment, s = 1), Table 7 (constant kappa; fresh k-means every epoch instead of warm centroids)
    "fixed-K": ["--no-merge"],
    "hard": ["--soft-k", "1"],
    "kappa-const": ["--kappa-estimator", "const"],
    "reinit": ["--reinit-centroids"],
}

# name -> (train.py data flags, number of classes, a writer of its folder or None)
SETS = {
    "fmnist": ([], 10, None),
    "digits": (["--data", "folder"], 10, lambda d: fmnist_folder.write_digits_folder(d)),
    "fm5": (["--data", "folder"], 5, lambda d: fmnist_folder.write_class_folder(d, 1000, 200, classes=5)),
    "fm7": (["--data", "folder"], 7, lambda d: fmnist_folder.write_class_folder(d, 1000, 200, classes=7, first=3)),
}


def set_flags(name, out):
    """train.py's flags for data set `name`, writing its folder first if it has one."""
    flags, _, writer = SETS[name]
    if writer is None:
        return flags
    folder = os.path.join(out, "data", name)
    if not os.path.exists(os.path.join(folder, ".done")):
        writer(folder)
        open(os.path.join(folder, ".done"), "w").close()
    return flags + ["--data-dir", folder]


def epochs_of(flags):
    return int(flags[flags.index("--epochs") + 1]) if "--epochs" in flags else DEFAULT_EPOCHS


def with_epochs(flags, epochs):
    flags = list(flags)
    if "--epochs" in flags:
        i = flags.index("--epochs")
        del flags[i:i + 2]
    return flags + ["--epochs", str(epochs)]


def run(cmd, log_path, env):
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if rc:
        tail = (open(log_path).read().strip().splitlines() or ["(empty log)"])[-1]
        raise RuntimeError(f"{os.path.basename(cmd[1])} failed (exit {rc}): {tail} -- see {log_path}")


def run_cell(cell, env):
    """Train and evaluate one (set, setting, seed) unless it is done; returns its cell.json."""
    d = cell["dir"]
    done = os.path.join(d, "cell.json")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(d, exist_ok=True)
    t0 = time.time()
    run([sys.executable, "train.py", "--out-dir", d, "--resume", "auto", "--seed", str(cell["seed"]),
         *cell["train_flags"]], os.path.join(d, "train.log"), env)
    t1 = time.time()
    run([sys.executable, "evaluate.py", "--checkpoint", os.path.join(d, "checkpoint.pth"), "--out-dir",
         os.path.join(d, "eval"), *cell["eval_flags"]], os.path.join(d, "eval.log"), env)
    t2 = time.time()
    res = json.load(open(os.path.join(d, "eval", "results.json")))
    log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    raw = res.get("raw_pixels") or {}
    row = {"set": cell["set"], "setting": cell["setting"], "mode": cell["mode"], "seed": cell["seed"],
           "classes": cell["classes"], "epochs": len(log),
           "train_s": round(sum(e["time"]["epoch"] for e in log), 1),   # the epochs' own clocks: resumes add up
           "eval_s": round(t2 - t1, 1), "wall_s": round(t2 - t0, 1),
           "knn": res["knn"]["top1"]["20"], "probe": (res.get("linear_probe") or {}).get("top1"),
           "kmeans_ami": res["kmeans"]["ami"], "kmeans_nmi": res["kmeans"]["nmi"],
           "K": (res.get("learned_clusters") or {}).get("K_mixture"),
           "learned_ami": (res.get("learned_clusters") or {}).get("ami"),
           "raw_knn": (raw.get("knn_top1") or {}).get("20"), "raw_kmeans_ami": (raw.get("kmeans") or {}).get("ami"),
           "K_per_epoch": " ".join(str(e["K"]) for e in log if "K" in e),
           "flags": " ".join(cell["train_flags"])}
    with open(done, "w") as f:
        json.dump(row, f, indent=1)
    return row


def mean_std(xs, digits=3):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def tables(out):
    """grid.csv and grid.md from every finished cell under `out`."""
    rows = []
    for root, _, files in os.walk(out):
        if "cell.json" in files:
            rows.append(json.load(open(os.path.join(root, "cell.json"))))
    rows.sort(key=lambda r: (r["set"], r["mode"], r["setting"], r["seed"]))
    if not rows:
        return ""
    with open(os.path.join(out, "grid.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| set (C) | mode | setting | epochs | seeds | kNN | kNN - raw | k-means AMI | AMI - raw | learned K | "
             "learned AMI | probe | train s | eval s |", "| " + " | ".join(["---"] * 14) + " |"]
    groups = {}
    for r in rows:
        groups.setdefault((r["set"], r["mode"], r["setting"]), []).append(r)
    for (s, mode, setting), rs in groups.items():
        col = lambda k: [r[k] for r in rs]   # noqa: E731
        dk = [r["knn"] - r["raw_knn"] for r in rs if r["raw_knn"] is not None]
        da = [r["kmeans_ami"] - r["raw_kmeans_ami"] for r in rs if r["raw_kmeans_ami"] is not None]
        ks = col("K")
        k_txt = "-" if None in ks else ", ".join(str(k) for k in ks)
        lines.append(f"| {s} ({rs[0]['classes']}) | {mode} | {setting} | {rs[0]['epochs']} | {len(rs)} | {mean_std(col('knn'))} | "
                     f"{mean_std(dk)} | {mean_std(col('kmeans_ami'))} | {mean_std(da)} | {k_txt} | "
                     f"{mean_std(col('learned_ami'))} | {mean_std(col('probe'))} | {mean_std(col('train_s'), 0)} | "
                     f"{mean_std(col('eval_s'), 0)} |")
    floors = {}
    for r in rows:
        floors.setdefault(r["set"], (r["raw_knn"], r["raw_kmeans_ami"]))
    lines += ["", "| set | raw pixels kNN | raw pixels k-means AMI |", "| --- | --- | --- |"]
    lines += [f"| {s} | {mean_std([k])} | {mean_std([a])} |" for s, (k, a) in sorted(floors.items())]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "grid.md"), "w") as f:
        f.write(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="screen", choices=["screen", "confirm"])
    p.add_argument("--settings", default="default", help="comma-separated names of SETTINGS (--list)")
    p.add_argument("--sets", default="fmnist,digits", help="comma-separated names of SETS (--list)")
    p.add_argument("--seeds", help="comma-separated (screen: 0; confirm: 0,1,2)")
    p.add_argument("--budget", type=float, help="fraction of each setting's epochs (screen: 1/3; confirm: 1)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (a GPU node's cores: one per 2-4 cores)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every cell (e.g. '--device cuda')")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags for every cell")
    p.add_argument("--out-dir", default="runs/recipe")
    p.add_argument("--list", action="store_true", help="print the settings and data sets, then exit")
    args = p.parse_args()
    if args.list:
        for k, v in SETTINGS.items():
            print(f"setting {k}: {' '.join(v) or '(the cpu preset)'}")
        for k, (flags, c, _) in SETS.items():
            print(f"set {k}: {c} classes {' '.join(flags)}")
        return
    settings, sets = args.settings.split(","), args.sets.split(",")
    for name, known in (*((s, SETTINGS) for s in settings), *((s, SETS) for s in sets)):
        if name not in known:
            p.error(f"unknown name {name!r}: one of {', '.join(known)}")
    seeds = [int(s) for s in (args.seeds or ("0" if args.mode == "screen" else "0,1,2")).split(",")]
    default_budget = 1 / 3 if args.mode == "screen" else 1.0
    budget = args.budget or default_budget
    tag = args.mode if budget == default_budget else f"{args.mode}-x{budget:g}"   # another budget, another cell
    eval_flags = (["--probe-epochs", "0", "--grid-clusters", "0"] if args.mode == "screen" else []) + args.eval_args.split()
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)

    env = dict(os.environ)
    if args.jobs > 1:   # share the cores: each cell's torch gets its part
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // args.jobs))
    cells = []
    for s in sets:
        data_flags = set_flags(s, out)
        for setting in settings:
            flags = SETTINGS[setting]
            for seed in seeds:
                cells.append({"set": s, "setting": setting, "seed": seed, "mode": tag, "classes": SETS[s][1],
                              "dir": os.path.join(out, s, setting, f"{tag}-seed{seed}"),
                              "train_flags": data_flags + args.train_args.split()
                              + with_epochs(flags, max(1, round(epochs_of(flags) * budget))),
                              "eval_flags": eval_flags})
    failed = []

    def one(cell):
        t0 = time.time()
        try:
            row = run_cell(cell, env)
            print(f"{cell['set']:7s} {cell['setting']:14s} seed {cell['seed']} | kNN {row['knn']:.3f} "
                  f"(raw {row['raw_knn']:.3f}) | k-means AMI {row['kmeans_ami']:.3f} (raw {row['raw_kmeans_ami']:.3f}) "
                  f"| K {row['K']} | learned AMI {row['learned_ami']} | {time.time() - t0:.0f}s", flush=True)
        except RuntimeError as e:
            failed.append(f"{cell['dir']}: {e}")
            print(f"{cell['set']} {cell['setting']} seed {cell['seed']}: {e}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, cells))
    print(tables(out))
    if failed:
        sys.exit(f"bench_recipe.py: {len(failed)} cell(s) failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
