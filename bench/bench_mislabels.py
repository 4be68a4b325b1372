"""
How well the mislabel report of evaluate.py (sec. 6.8) finds wrong labels: a seeded share
of a checkpoint's training labels is flipped to another class on purpose, and each vote
(`evaluate.py --mislabel-votes`) ranks the suspects from the frozen features.

    python bench/bench_mislabels.py --checkpoint runs/cpu/checkpoint.pth
    python bench/bench_mislabels.py --checkpoint ckpt.pth --flip 0.05 --knn-k 10,20,50 --train-subset 10000

Per vote: the suspects flagged, the share of the flipped images among them (recall), and
the share of the flipped images in the top 1x and 2x (number flipped) of the ranking. The
data set's own wrong labels (Fashion-MNIST has some) count as false alarms here, so every
figure is a lower bound.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate as ev  # noqa: E402
import model  # noqa: E402
import report  # noqa: E402
import utils  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (its mixture gives the cluster vote)")
    p.add_argument("--flip", type=float, default=0.02, help="share of the training labels flipped to another class")
    p.add_argument("--knn-k", default="20", help="neighbours of the kNN vote, comma-separated")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of the votes exp(cos / T)")
    p.add_argument("--train-subset", type=int, default=0, help="seeded random subset of the train split (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="subset and flips")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if not 0 < args.flip < 1:
        p.error(f"--flip {args.flip}: a share in (0, 1), e.g. 0.02")
    try:
        ks = [int(k) for k in args.knn_k.split(",")]
    except ValueError:
        p.error(f"--knn-k {args.knn_k!r}: expected comma-separated integers such as 10,20,50")

    # the checkpoint's features and learned clusters, exactly as evaluate.py computes them
    eargs = ev.get_args(["--checkpoint", args.checkpoint, "--workers", str(args.workers), "--no-raw"])
    try:
        utils.setup_distributed(eargs)
        backbone, _, embed, mixture, _ = model.load_pretrained(eargs, eargs.device)
    except utils.UserError as e:
        p.error(str(e))
    if mixture is None:
        p.error(f"{args.checkpoint} has no mixture: the cluster vote needs one")
    ds = data.subset(data.load_dataset(eargs.data, eargs.data_dir, "train", data.eval_transform(eargs.data, eargs.img_size)),
                     args.train_subset, args.seed)
    split = ev.extract(ds, backbone, embed, eargs)
    feats, labels = split.feats, split.labels
    clusters, cos, _ = ev.assign_clusters(split.emb, mixture.centroids, eargs.device)

    # flip a seeded share of the labels, each to one of the other classes
    labels = labels.numpy()
    C = int(labels.max()) + 1
    rng = np.random.default_rng(args.seed)
    n = len(labels)
    nf = max(1, round(args.flip * n))
    flipped = rng.choice(n, nf, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, C, nf)) % C

    print(f"{args.checkpoint}: {n} train images, {nf} labels flipped ({args.flip:.1%}), "
          f"learned K = {mixture.centroids.shape[0]}")
    print(f"| votes | suspects | flips among them | flips in top {nf} | flips in top {2 * nf} |")
    print("| --- | --- | --- | --- | --- |")
    votes = [(f"cluster (K = {mixture.centroids.shape[0]})", report.cluster_label_votes(noisy, clusters))]
    votes += [(f"kNN, k = {k}", report.knn_label_votes(feats, noisy, k, args.knn_t, C)) for k in ks]
    for name, (suggested, share) in votes:
        order = report.mislabel_ranking(noisy, suggested, share, cos)
        hit = np.isin(order, flipped)
        print(f"| {name} | {len(order)} | {hit.sum() / nf:.3f} | {hit[:nf].sum() / nf:.3f} | {hit[:2 * nf].sum() / nf:.3f} |")


if __name__ == "__main__":
    main()
