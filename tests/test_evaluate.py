"""Tests of evaluate.py: known answers, agreement with scikit-learn, real Fashion-MNIST
subsets, and an end-to-end run on a tiny checkpoint whose every output file is opened.
CPU only, well under a minute in all."""

import csv
import dataclasses
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn import metrics as skm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate as ev  # noqa: E402
import report  # noqa: E402
import utils  # noqa: E402
from cluster import VMFMixture  # noqa: E402
from conftest import HAVE_FMNIST, needs_fmnist  # noqa: E402
from model import ModelConfig, build_backbone  # noqa: E402



@pytest.fixture(scope="module")
def fmnist():
    """Real Fashion-MNIST train split as raw pixels in [0, 1] (N x 784) and labels."""
    ds = data.FashionMNIST(None, train=True)
    x = torch.from_numpy(ds.images.reshape(len(ds), -1).astype(np.float32) / 255)
    return x, ds.targets.clone()


def real_subset(fmnist, n, seed=0):
    x, y = fmnist
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


# ----------------------------------------------------------------------------- kNN
def test_knn_known_answer_weighted_votes():
    # test point q = e0. Train: two class-0 points at cos 0.9, one class-1 point at cos 1.0,
    # one class-2 point far away. With k = 3 a plain majority says class 0; DINO's votes
    # exp(cos / 0.07) give class 1: exp(1 / .07) = 4.2 x exp(.9 / .07) > 2 x exp(.9 / .07).
    s = math.sqrt(1 - 0.9 ** 2)
    train = torch.tensor([[0.9, s, 0.0], [0.9, -s, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([[2.0, 0.0, 0.0]])               # not unit: knn_classify normalises
    p = ev.knn_classify(train, labels, q, ks=(1, 3, 4), T=0.07, num_classes=3)
    assert p[1][0, 0] == 1 and p[3][0, 0] == 1 and p[4][0, 0] == 1
    assert p[3][0].tolist() == [1, 0, 2]              # ranked by votes: 1, then 0, then 2 (no vote)
    # a huge temperature makes every vote ~1: the plain majority, class 0, wins
    assert ev.knn_classify(train, labels, q, ks=(3,), T=1e6, num_classes=3)[3][0, 0] == 0


def test_knn_matches_naive_loop_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    T = 0.1
    tr, te = F.normalize(train, dim=1), F.normalize(test, dim=1)
    for k in (1, 5, 20):
        expect = []
        for q in te:                                      # DINO eval_knn, one image at a time
            sims = tr @ q
            top = sims.argsort(descending=True)[:k]
            votes = torch.zeros(4)
            for j in top:
                votes[labels[j]] += torch.exp(sims[j] / T)
            expect.append(int(votes.argmax()))
        whole = ev.knn_classify(train, labels, test, ks=(1, 5, 20), T=T, num_classes=4)
        chunked = ev.knn_classify(train, labels, test, ks=(1, 5, 20), T=T, num_classes=4, chunk_elems=60 * 3)
        assert whole[k][:, 0].tolist() == expect
        assert torch.equal(whole[k], chunked[k])
    assert ev.topk_accuracy(torch.tensor([[1, 2], [0, 1], [2, 0]]), torch.tensor([1, 1, 1]), 1) == pytest.approx(1 / 3)
    assert ev.topk_accuracy(torch.tensor([[1, 2], [0, 1], [2, 0]]), torch.tensor([1, 1, 1]), 2) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- metrics
def info_scores(labels, clusters):
    """NMI, AMI (arithmetic normalisation, scikit-learn's default) and ARI from their
    definitions, in plain Python: mutual information and entropies of the contingency table;
    the expected MI under the hypergeometric model (Vinh, Epps and Bailey 2010); ARI from
    pair counts (Hubert and Arabie 1985)."""
    n = len(labels)
    table = {}
    for u, v in zip(labels, clusters):
        table[u, v] = table.get((u, v), 0) + 1
    a = {u: sum(c for (x, _), c in table.items() if x == u) for u in set(labels)}
    b = {v: sum(c for (_, y), c in table.items() if y == v) for v in set(clusters)}
    mi = sum(c / n * math.log(n * c / (a[u] * b[v])) for (u, v), c in table.items())
    hu, hv = (-sum(x / n * math.log(x / n) for x in m.values()) for m in (a, b))
    lf = lambda k: math.lgamma(k + 1)                                          # noqa: E731
    emi = 0.0
    for ai in a.values():
        for bj in b.values():
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                p = math.exp(lf(ai) + lf(bj) + lf(n - ai) + lf(n - bj) - lf(n) - lf(nij) - lf(ai - nij)
                             - lf(bj - nij) - lf(n - ai - bj + nij))
                emi += nij / n * math.log(n * nij / (ai * bj)) * p
    pairs = lambda k: k * (k - 1) / 2                                          # noqa: E731
    sij, sa, sb = sum(map(pairs, table.values())), sum(map(pairs, a.values())), sum(map(pairs, b.values()))
    expected = sa * sb / pairs(n)
    return {"nmi": mi / ((hu + hv) / 2), "ami": (mi - emi) / ((hu + hv) / 2 - emi),
            "ari": (sij - expected) / ((sa + sb) / 2 - expected)}


def test_cluster_metrics_against_their_definitions_and_known_values():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    clusters = np.where(rng.random(60) < 0.7, labels * 2 + rng.integers(0, 2, 60), rng.integers(0, 8, 60))
    m, want = ev.cluster_metrics(labels, clusters), info_scores(labels.tolist(), clusters.tolist())
    for key in ("nmi", "ami", "ari"):
        assert m[key] == pytest.approx(want[key], abs=1e-9), key
    assert m["K"] == 8 and 0.2 < m["ami"] < 0.8                # a partly right clustering, not a corner case
    # a clustering independent of the labels: AMI and ARI near 0, where NMI is not
    noise = ev.cluster_metrics(rng.integers(0, 4, 2000), rng.integers(0, 40, 2000))
    assert abs(noise["ami"]) < 0.01 and abs(noise["ari"]) < 0.01 and noise["nmi"] > 0.01
    # majority-label accuracy by hand: cluster 7 -> {0, 0, 1}, cluster 9 -> {1, 2, 2, 2}: (2 + 3) / 7
    labels, clusters = [0, 0, 1, 1, 2, 2, 2], [7, 7, 7, 9, 9, 9, 9]
    assert ev.majority_accuracy(labels, clusters) == pytest.approx(5 / 7)
    # Hungarian: one-to-one, so both clusters cannot take class 2; best map 7->0, 9->2: (2 + 3) / 7
    assert ev.hungarian_accuracy(labels, clusters) == pytest.approx(5 / 7)
    labels, clusters = [0, 0, 0, 1, 1, 2], [5, 5, 6, 6, 6, 6]
    assert ev.majority_accuracy(labels, clusters) == pytest.approx(4 / 6)   # 5->0 (2), 6->1 (2)
    assert ev.hungarian_accuracy(labels, clusters) == pytest.approx(4 / 6)
    labels, clusters = [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]   # 1->0 (2 of 3), 0->1 (2)
    assert ev.hungarian_accuracy(labels, clusters) == pytest.approx(4 / 5)
    # a relabelled perfect clustering scores 1 on every metric
    labels = rng.integers(0, 6, 300)
    perm = rng.permutation(6) + 10
    assert all(v == pytest.approx(1.0) for k, v in ev.cluster_metrics(labels, perm[labels]).items() if k != "K")
    # two clusters per class: majority accuracy stays 1, Hungarian (one-to-one) cannot
    split = labels * 2 + rng.integers(0, 2, 300)
    assert ev.majority_accuracy(labels, split) == 1.0 and ev.hungarian_accuracy(labels, split) < 0.75


def test_spherical_kmeans_and_assignment_recover_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1) * 5
    labels = torch.arange(4).repeat_interleave(50)
    x = centres[labels] + 0.3 * torch.randn(200, 16, generator=g)
    ids, cents = ev.spherical_kmeans(x, 4, seed=0, nredo=2)
    assert ev.hungarian_accuracy(labels.numpy(), ids) == 1.0
    assert torch.allclose(cents.norm(dim=1), torch.ones(4), atol=1e-4)
    a, cos, margin = ev.assign_clusters(x, cents)
    sims = (F.normalize(x, dim=1) @ F.normalize(cents, dim=1).T).sort(dim=1, descending=True).values
    assert (a == ids).all()
    assert np.allclose(cos, sims[:, 0].numpy(), atol=1e-5)                   # the cosine to the nearest
    assert np.allclose(margin, (sims[:, 0] - sims[:, 1]).numpy(), atol=1e-5)  # its lead over the second


# ----------------------------------------------------------------------------- linear probe
@needs_fmnist
def test_linear_probe_real_subset_beats_chance_fast(fmnist):
    x, y = real_subset(fmnist, 3000, seed=1)
    r, fc = ev.linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], 10, epochs=10, lr=0.1, batch_size=256)
    assert r["top1"] > 0.7          # chance is 0.1; logistic regression on all 60k pixels: 0.84
    assert fc.weight.shape == (10, 784)
    # the reported top-1 is the returned classifier's, on the test rows standardised with the train statistics
    mean, std = x[:2000].mean(0), x[:2000].std(0).clamp_min(1e-6)
    pred = fc((x[2000:] - mean) / std).argmax(1)
    assert r["top1"] == pytest.approx((pred == y[2000:]).float().mean().item(), abs=2e-3)


def eval_args(*extra):
    """evaluate.py's flags for calling its functions directly, on one CPU process."""
    args = ev.get_args(["--backbone", "unused.pth", "--workers", "0"] + list(extra))
    args.data, args.img_size = "fashion-mnist", 8
    return utils.setup_distributed(args)


def test_frozen_backbone_check_can_fail():
    """MoCo v3's sanity check: extraction (eval mode) leaves every tensor, BN running
    statistics included, bit-identical; a train-mode forward changes them and is caught."""
    model = ModelConfig("resnet18", small_stem=True, in_chans=1, proj_hidden=32, pred_hidden=32, dim=16).build()
    bb = model.backbone
    digest = utils.state_digest(bb)
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)          # as the loaders send images
    ds = [(x[i], 0, i) for i in range(8)]            # (uint8 image, label, index), as the data sets give
    split = ev.extract(ds, bb, model.eval().embed, eval_args("--feature-batch-size", "8"))
    f, z = split.feats, split.emb
    assert f.shape == (8, 512) and z.shape == (8, 16) and torch.allclose(z.float().norm(dim=1), torch.ones(8), atol=1e-2)
    assert utils.changed_keys(bb, digest) == []
    bb.train()
    bb(x.float())                                       # BN running stats move
    assert "bn1.running_mean" in utils.changed_keys(bb, digest)


def test_feature_store_is_half_precision_and_its_size_is_what_it_says():
    """N rows of F-d features take N x F x 2 bytes (half of float32), the embeddings N x D x
    2, the raw pixels N x P x 1: Split.nbytes() is the memory evaluate.py holds for a split."""
    model = ModelConfig("resnet18", small_stem=True, in_chans=1, proj_hidden=32, pred_hidden=32, dim=16).build().eval()
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    split = ev.extract([(x[i], i % 2, i) for i in range(10)], model.backbone, model.embed, eval_args("--feature-batch-size", "4"))
    assert split.feats.dtype == torch.float16 and split.emb.dtype == torch.float16 and split.raw.dtype == torch.uint8
    assert split.nbytes() == 10 * 512 * 2 + 10 * 16 * 2 + 10 * 64 + 10 * 8
    assert torch.equal(split.raw, x.flatten(1))          # the eval view itself: 8 px, decoded once
    assert split.labels.tolist() == [i % 2 for i in range(10)]


# ----------------------------------------------------------------------------- mislabels
def test_mislabel_ranking_known_case():
    # cluster 0: eight 'A' and one 'B'; cluster 1: five 'C', three 'D' (a look-alike class)
    labels = np.array([0] * 8 + [1] + [2] * 5 + [3] * 3)
    clusters = np.array([0] * 9 + [1] * 8)
    conf = np.linspace(0.5, 0.9, 17)
    suggested, share = report.cluster_label_votes(labels, clusters)
    assert (suggested == np.array([0] * 9 + [2] * 8)).all()
    assert share[8] == pytest.approx(1 / 9) and share[14] == pytest.approx(3 / 8) and share[0] == pytest.approx(8 / 9)
    order = report.mislabel_ranking(labels, suggested, share, conf)
    assert order[0] == 8                                  # the lone 'B' (share 1/9) first
    assert order[1:].tolist() == [16, 15, 14]             # then the D's, most confident first


def test_knn_label_votes_leave_one_out():
    # four points on a circle: 0 and 1 close (labels 0, 1), 2 and 3 close (labels 1, 1).
    # With k = 1 each point's vote comes from its nearest OTHER point, never itself.
    a = np.radians([0, 10, 90, 100])
    x = torch.tensor(np.stack([np.cos(a), np.sin(a)], 1), dtype=torch.float32)
    labels = np.array([0, 1, 1, 1])
    suggested, share = report.knn_label_votes(x, labels, k=1, T=0.07, num_classes=2)
    assert suggested.tolist() == [1, 0, 1, 1] and share.tolist() == [0.0, 0.0, 1.0, 1.0]
    # k = 3 (all others), T = 1e6 (equal votes): point 0 sees labels 1, 1, 1; point 1 sees 0, 1, 1
    suggested, share = report.knn_label_votes(x, labels, k=3, T=1e6, num_classes=2)
    assert suggested.tolist() == [1, 1, 1, 1]
    assert share == pytest.approx([0.0, 2 / 3, 2 / 3, 2 / 3])
    # exact duplicates may crowd an image's own row out of the search: it still never votes
    dup = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    for k in (1, 2):
        suggested, share = report.knn_label_votes(dup, np.array([0, 1, 1, 0]), k=k, num_classes=2)
        assert suggested[0] == 1 and share[0] == 0.0


@needs_fmnist
def test_mislabel_report_ranks_flipped_labels_near_top(fmnist):
    """2% of a real 2,000-image subset gets a wrong label on purpose. Votes come from
    spherical k-means clusters on the raw pixels, K = 10 as where the CPU default's mixture
    ends, or from each image's 20 nearest other images (labels unseen in both); most
    flipped images must rank in the top 2 x (number flipped) of the suspects (a random
    order would put ~12% there)."""
    x, y = real_subset(fmnist, 2000, seed=0)
    rng = np.random.default_rng(0)
    flip = rng.choice(2000, 40, replace=False)
    noisy = y.numpy().copy()
    noisy[flip] = (noisy[flip] + rng.integers(1, 10, 40)) % 10
    _, cents = ev.spherical_kmeans(x, 10, seed=0, nredo=1)
    ids, cos, margin = ev.assign_clusters(x, cents)
    found = {}
    for votes in ("cluster", "knn"):
        suggested, share = (report.cluster_label_votes(noisy, ids) if votes == "cluster"
                            else report.knn_label_votes(x, noisy, k=20, num_classes=10))
        for conf in (cos, margin):
            order = report.mislabel_ranking(noisy, suggested, share, conf)
            assert np.isin(flip, order).mean() >= 0.9            # almost every flip is a suspect at all
            top = np.isin(flip, order[:80]).mean()
            assert top >= 0.5, f"{votes}: only {top:.0%} of the flipped labels in the top 80 of {len(order)} suspects"
            assert 80 / len(order) < 0.25                        # and the top 80 is a small part of the list
            found[votes] = top, len(order)
    # at K = 10 every cluster mixes classes; the 20 nearest images are the finer vote: far
    # fewer suspects (519 against 892 here), at least as many flips on top
    assert found["knn"][1] < 0.7 * found["cluster"][1] and found["knn"][0] >= found["cluster"][0]


def test_read_k_history(tmp_path):
    lines = [{"epoch": 1, "K": 100}, {"epoch": 2, "K": 60}, {"epoch": 2, "K": 55}, {"epoch": 3, "loss": 1.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"epoch": 4, "K"')
    assert report.read_k_history(str(tmp_path)) == ([1, 2], [100, 55])   # resumed epoch: last wins; torn line skipped
    m = VMFMixture(4, 3)
    m.k_history = [9, 7]
    assert report.read_k_history(str(tmp_path / "nowhere"), m) == ([1, 2], [9, 7])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint in train.py's format from an untrained tiny SiamMM on 8 px images, with
    a mixture fit on its embeddings of real images, a log.jsonl and an exported backbone."""
    if not HAVE_FMNIST:
        pytest.skip("apt-get install dataset-fashion-mnist")
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    targs = dict(data="fashion-mnist", data_dir="", arch="resnet18", small_stem=True, width=16, img_size=8, subset=300,
                 proj_hidden=32, pred_hidden=32, dim=16, seed=0, num_clusters=12, crop_min=0.2,
                 feature_bn="batch")   # embed()'s default below, as train.py's feature pass
    cfg = ModelConfig("resnet18", True, 1, 16, 32, 32, 16)               # the CPU preset's narrow ResNet
    model = cfg.build().eval()
    ds = data.subset(data.load_dataset("fashion-mnist", "", "train", data.eval_transform("fashion-mnist", 8)), 300, 0)
    z = torch.cat([model.embed(data.to_input(x, "fashion-mnist", torch.device("cpu")))
                   for x, _, _ in torch.utils.data.DataLoader(ds, batch_size=150)])
    mix = VMFMixture(16, 12, kappa_estimator="banerjee", init_iters=5)
    mix.fit(z, torch.arange(len(z)), len(z))
    mix.k_history = [12, int(mix.centroids.shape[0])]
    state = model.state_dict() | {"predictor.3.bias": torch.zeros(16)}   # a predictor of another shape: unused
    shape = dataclasses.asdict(cfg)
    torch.save({"model": state, "model_config": shape, "mixture": mix.state_dict(), "epoch": 2, "args": targs},
               d / "checkpoint.pth")
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("momentum_projector.")},
                "model_config": shape, "mixture": None, "epoch": 2, "args": targs}, d / "headless.pth")
    (d / "log.jsonl").write_text(json.dumps({"epoch": 1, "K": 12}) + "\n" + json.dumps({"epoch": 2, "K": 11}) + "\n")
    torch.save(model.export_backbone(), d / "backbone.pth")
    return d


def check_outputs(out, res, n_grids):
    loaded = json.loads((out / "results.json").read_text())
    assert loaded["knn"]["top1"] == res["knn"]["top1"]
    for p in [out / "mislabels.png"] + [out / "clusters" / f for f in os.listdir(out / "clusters")]:
        with Image.open(p) as im:
            im.verify()                                   # a complete, readable PNG
    assert len(os.listdir(out / "clusters")) == n_grids
    with open(out / "mislabels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == res["report"]["num_suspects"] > 0
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["label"] != r["suggested"] for r in rows)
    shares = [float(r["label_share"]) for r in rows]
    assert shares == sorted(shares)                       # rarest label in its votes first
    return loaded


@needs_fmnist
def test_end_to_end_checkpoint_writes_every_report_file(tiny_run, capsys):
    out = tiny_run / "eval"
    res = ev.main(["--checkpoint", str(tiny_run / "checkpoint.pth"), "--train-subset", "200", "--test-subset", "100",
                   "--workers", "0", "--probe-epochs", "5", "--knn-k", "5,20", "--grid-clusters", "4",
                   "--kmeans-redo", "1"])
    loaded = check_outputs(out, res, n_grids=4)
    with Image.open(out / "k_per_epoch.png") as im:
        im.verify()
    assert loaded["report"]["k_history"] == {"1": 12, "2": 11}
    assert loaded["split"]["train"] == 200 and loaded["split"]["test"] == 100
    assert set(loaded["knn"]["top1"]) == {"5", "20"}
    assert loaded["raw_pixels"]["knn_top1"]["20"] > 0.5         # real images: the raw-pixel floor is far above chance
    mixture = torch.load(tiny_run / "checkpoint.pth", weights_only=False)["mixture"]
    assert loaded["learned_clusters"]["K_mixture"] == len(mixture["centroids"])   # the checkpoint's own clusters
    assert loaded["kmeans"]["K"] == 10                          # k-means at the number of classes
    assert loaded["backbone_unchanged"] is True
    assert loaded["learned_clusters"]["split"] == "test" and loaded["report"]["split"] == "train"
    stdout = capsys.readouterr().out
    assert "kNN top-1, k=20" in stdout and "learned clusters" in stdout and "raw pixels" in stdout


@needs_fmnist
def test_end_to_end_exported_backbone(tiny_run):
    out = tiny_run / "eval_bb"
    res = ev.main(["--backbone", str(tiny_run / "backbone.pth"), "--img-size", "8", "--train-subset", "120",
                   "--test-subset", "60", "--workers", "0", "--probe-epochs", "2", "--no-raw", "--grid-clusters", "3",
                   "--kmeans-redo", "1", "--out-dir", str(out)])
    check_outputs(out, res, n_grids=3)
    assert res["learned_clusters"] is None and res["raw_pixels"] is None
    assert res["source"]["small_stem"] is True                  # read off conv1's 3 x 3 kernel
    assert res["source"]["width"] == 16                         # and off its 16 output channels
    assert "k_per_epoch" not in res["report"] and not (out / "k_per_epoch.png").exists()


@needs_fmnist
def test_bench_mislabels_scores_both_votes(tiny_run):
    """bench/bench_mislabels.py flips labels of the checkpoint's train images and scores
    each vote of the mislabel report: a row per vote, each ranking its flips well above
    where a random order of its suspects would put them."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_mislabels.py"), "--checkpoint",
                          str(tiny_run / "checkpoint.pth"), "--train-subset", "300", "--flip", "0.1", "--knn-k", "5,20",
                          "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "300 train images, 30 labels flipped" in lines[0]
    rows = [ln.split("|")[1:-1] for ln in lines[3:]]
    assert [r[0].strip() for r in rows] == [f"cluster (K = {lines[0].split('K = ')[1]})", "kNN, k = 5", "kNN, k = 20"]
    for r in rows:   # suspects, flips among them, in the top 30, in the top 60
        suspects, among, top2 = int(r[1]), float(r[2]), float(r[4])
        assert among > 0.8                                # a flipped label rarely matches its votes
        assert top2 > 1.5 * among * 60 / suspects         # the ranking beats a random order of the suspects


@pytest.mark.parametrize("argv, msg", [
    (["--checkpoint", "/nonexistent/checkpoint.pth"], "no such file"),
    (["--backbone", "/nonexistent/backbone.pth"], "no such file"),
    (["--checkpoint", "x.pth", "--knn-k", "abc"], "--knn-k"),
    (["--checkpoint", "x.pth", "--backbone", "y.pth"], "not allowed with"),
    (["--checkpoint", "x.pth", "--feature-batch-size", "1"], "--feature-batch-size 1"),    # was: a BatchNorm ValueError
])
def test_errors_are_one_line_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error:") and msg in err, err


@needs_fmnist
def test_checkpoint_without_momentum_head_is_one_line_error(tiny_run, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", str(tiny_run / "headless.pth")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "momentum_projector." in err, err


def test_not_a_checkpoint_is_one_line_error(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    torch.save({"conv1.weight": torch.zeros(64, 1, 3, 3)}, tmp_path / "bb.pth")
    for argv, msg in ((["--checkpoint", str(tmp_path / "junk.pth")], "cannot read checkpoint"),
                      (["--checkpoint", str(tmp_path / "bb.pth")], "not a train.py checkpoint"),
                      (["--backbone", str(tmp_path / "bb.pth")], "do not fit --arch")):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and msg in err, err


def test_unreadable_image_in_a_worker_is_one_line_error(tmp_path, capsys):
    """An ImageFolder with a corrupt file, read by a DataLoader worker: the error names the
    file on one line (the worker's traceback is not shown)."""
    from model import build_backbone
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
            for i in range(2):
                Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"not a png")
    net, _ = build_backbone("resnet18", small_stem=True, in_chans=3)
    torch.save(net.state_dict(), tmp_path / "bb.pth")
    with pytest.raises(SystemExit) as e:
        ev.main(["--backbone", str(tmp_path / "bb.pth"), "--data", "folder", "--data-dir", str(tmp_path),
                 "--img-size", "8", "--workers", "1", "--knn-k", "2", "--out-dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("evaluate.py: error: cannot read image") and "broken.png" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_mislabel_votes_auto_takes_the_self_knn_up_to_its_limit_only():
    """--mislabel-votes auto (the default): the leave-one-out kNN vote for a report split of
    up to SELF_KNN_MAX images, the cluster vote above (ImageNet's train split)."""
    args = ev.get_args(["--backbone", "x.pth", "--no-raw", "--device", "cpu", "--data", "fashion-mnist"])
    args.device, args.img_size = torch.device("cpu"), 16
    assert args.mislabel_votes == "auto"
    assert ev.plan(1000, 100, 8, 0, 10, args) == "knn"
    assert ev.plan(ev.SELF_KNN_MAX + 1, 100, 8, 0, 10, args) == "cluster"
    assert args.mislabel_votes == "auto"                     # plan says which; the flags stay as given
    args = ev.get_args(["--backbone", "x.pth", "--no-raw", "--mislabel-votes", "knn", "--data", "fashion-mnist"])
    args.device, args.img_size = torch.device("cpu"), 16
    assert ev.plan(1000, 100, 8, 0, 10, args) == "knn" and args.amp == "none"   # evaluation in fp32 unless asked


def test_export_backbone_writes_the_checkpoints_backbone_for_torchvision(tiny_run, tmp_path, capsys):
    """evaluate.py --export-backbone: the checkpoint's online (or momentum) backbone, bit for
    bit, as a state_dict that --backbone and build_backbone read strictly."""
    ckpt = torch.load(tiny_run / "checkpoint.pth", weights_only=False)
    for encoder, prefix in (("online", "backbone."), ("momentum", "momentum_backbone.")):
        out = tmp_path / f"{encoder}.pth"
        assert ev.main(["--checkpoint", str(tiny_run / "checkpoint.pth"), "--encoder", encoder,
                        "--export-backbone", str(out)]) is None
        sd = torch.load(out, weights_only=True)
        mine = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        assert sorted(sd) == sorted(mine) and all(torch.equal(sd[k], mine[k]) for k in sd)
        cfg = ckpt["model_config"]
        net, _ = build_backbone(cfg["arch"], cfg["small_stem"], cfg["in_chans"], cfg["width"])
        net.load_state_dict(sd, strict=True)
    assert "--backbone" in capsys.readouterr().out
