"""
Where does K stop? The mixture's own fit + merge loop (cluster.VMFMixture, the rules of
cluster.MERGE_RULES) on fixed features of known K, from several K0, in seconds per case:
a merge rule is tried here before it is tried in training.

    python bench/bench_kstop.py                              # the synthetic grid, every rule
    python bench/bench_kstop.py --k 10,50 --dims 128 --rules bic
    python bench/bench_kstop.py --checkpoint runs/cpu/checkpoint.pth   # a trained model's embeddings

Synthetic features: a vMF mixture drawn with scipy.stats.vonmises_fisher, K random mean
directions in D dimensions, every component with the same mean resultant length rbar (its
kappa from eq. 7; rbar 0.8 is well separated, 0.3 barely), component sizes unequal (a
factor up to e^2 between them), 200 samples a component on average (50 for K = 1,000).
Spherical k-means at the true K (the same mixture's k-means, best of 3 restarts) tells
whether the clusters are separable at all; a rule is held to the true K only where that
reaches AMI >= 0.95. A checkpoint: the momentum embeddings of its training images (its own
feature pass: data, subset, image size, BN mode), the labels as the truth.

Each case: fit K0 clusters (k-means from a random init), then rounds of merge + warm-started
fit (3 Lloyd iterations, as an epoch of train.py does) until two rounds in a row merge
nothing, at most --rounds. Prints K at the end and the AMI of the final clusters.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import vonmises_fisher
from sklearn.metrics import adjusted_mutual_info_score as ami

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cluster import MERGE_RULES, VMFMixture, kappa_mle, nearest_centroid  # noqa: E402


def vmf_features(K, D, rbar, seed, per_cluster=200):
    """N x D unit features from K vMF components of mean resultant length rbar, and labels."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((K, D))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    sizes = np.exp(rng.uniform(-1, 1, K))
    sizes = np.maximum(20, np.round(sizes / sizes.mean() * per_cluster)).astype(int)
    kappa = float(kappa_mle(torch.tensor(rbar, dtype=torch.float64), D))
    X = np.concatenate([vonmises_fisher(means[k], kappa).rvs(sizes[k], random_state=rng) for k in range(K)])
    y = np.repeat(np.arange(K), sizes)
    perm = rng.permutation(len(y))
    return torch.from_numpy(X[perm]).float(), y[perm]


def assign(X, m):
    return nearest_centroid(X.numpy(), m.centroids.numpy())[1]


def kmeans_ami(X, y, K, seed):
    """AMI of spherical k-means at the true K: can these clusters be told apart at all?"""
    m = VMFMixture(X.shape[1], K, kappa_estimator="const", init_iters=30, reinit_centroids=True, nredo=3, seed=seed)
    m.fit(X, torch.arange(len(X)), len(X))
    return ami(y, assign(X, m))


def kstop(X, y, K0, rule, flags, rounds, seed, kappa_estimator="banerjee", pca_dim=150):
    """The fit + merge loop from K0; returns (final K, AMI of the final clusters, rounds, seconds)."""
    t0, N = time.time(), len(X)
    idx = torch.arange(N)
    m = VMFMixture(X.shape[1], K0, kappa_estimator=kappa_estimator, pca_dim=pca_dim, init_iters=10, kmeans_iters=3, seed=seed)
    m.fit(X, idx, N)
    quiet = r = 0
    for r in range(1, rounds + 1):
        merged, _ = m.merge(merge_rule=rule, min_clusters=1, **flags)
        m.fit(X, idx, N)
        quiet = quiet + 1 if merged == 0 else 0
        if quiet == 2:
            break
    return int(m.centroids.shape[0]), ami(y, assign(X, m)), r, time.time() - t0


def checkpoint_features(path, subset, workers):
    """The momentum embeddings of a checkpoint's training images, as its feature pass makes them."""
    import data
    import evaluate as ev
    import model
    import utils
    args = ev.get_args(["--checkpoint", path, "--workers", str(workers), "--no-raw", "--train-subset", str(subset)])
    utils.setup_distributed(args)
    backbone, _, embed, mixture, targs = model.load_pretrained(args, args.device)
    ds = data.subset(data.load_dataset(args.data, args.data_dir, "train", data.eval_transform(args.data, args.img_size)),
                     subset, args.seed)
    split = ev.extract(ds, backbone, embed, args)
    return split.emb.float(), split.labels.numpy(), targs


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--rules", default=",".join(sorted(MERGE_RULES)), help="comma-separated keys of cluster.MERGE_RULES")
    p.add_argument("--merge-lambda", type=float, default=1.625, help="eq. 11's lambda (the CPU preset's)")
    p.add_argument("--k", default="5,10,20,50,100,1000", help="true K of the synthetic mixtures")
    p.add_argument("--dims", default="32,128,256")
    p.add_argument("--rbar", default="0.8,0.5,0.3", help="mean resultant lengths, well to barely separated")
    p.add_argument("--k0", default="2,10,50", help="K0 as multiples of the true K (at most N / 4)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="instead of the synthetic grid: a train.py checkpoint's embeddings")
    p.add_argument("--subset", type=int, default=5000, help="--checkpoint: training images embedded")
    p.add_argument("--k0-abs", default="100,500,1000", help="--checkpoint: K0 values")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    rules = args.rules.split(",")
    unknown = [r for r in rules if r not in MERGE_RULES]
    if unknown:
        p.error(f"--rules: unknown {unknown}; the rules are {sorted(MERGE_RULES)}")
    flags = {"merge_lambda": args.merge_lambda}
    print(f"| features | true K | K0 | k-means AMI at true K | " + " | ".join(f"{r}: K, AMI" for r in rules) + " | s |")
    print("|" + " --- |" * (5 + len(rules)))
    if args.checkpoint:
        X, y, targs = checkpoint_features(args.checkpoint, args.subset, args.workers)
        C = len(np.unique(y))
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))} ({targs['data']}, N = {len(y)})"
        base = kmeans_ami(X, y, C, args.seed)
        for K0 in map(int, args.k0_abs.split(",")):
            t0, cells = time.time(), []
            for rule in rules:
                k, a, _, _ = kstop(X, y, K0, rule, flags, args.rounds, args.seed,
                                    targs.get("kappa_estimator") or targs["kappa"].replace("mle", "banerjee"), targs["pca_dim"])
                cells.append(f"{k}, {a:.2f}")
            print(f"| {name} | {C} | {K0} | {base:.2f} | " + " | ".join(cells) + f" | {time.time() - t0:.0f} |", flush=True)
        return
    for K in map(int, args.k.split(",")):
        for D in map(int, args.dims.split(",")):
            for rbar in map(float, args.rbar.split(",")):
                per = 50 if K >= 1000 else 200
                X, y = vmf_features(K, D, rbar, args.seed, per)
                base = kmeans_ami(X, y, K, args.seed)
                for ratio in map(int, args.k0.split(",")):
                    K0 = min(ratio * K, len(y) // 4)
                    t0, cells = time.time(), []
                    for rule in rules:
                        k, a, _, _ = kstop(X, y, K0, rule, flags, args.rounds, args.seed)
                        cells.append(f"{k}, {a:.2f}")
                    print(f"| vMF D={D} rbar={rbar} N={len(y)} | {K} | {K0} | {base:.2f} | " + " | ".join(cells)
                          + f" | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
