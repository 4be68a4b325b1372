"""The epoch's steps where they meet, on 1 and 2 processes (gloo), on a class-sorted image
folder: every training step must train on its own images' E-step assignment, and two ranks
must train one model.

train.py runs with recorders on its seams (tests/spy.py): which files each step read, which
nbr / w rows reached its loss, each feature pass's output, each rank's parameters and
mixture after each epoch. The checks below recompute what those rows should be from the
files alone (file -> its feature-pass embedding -> its nearest centroids and eq. 10
weights), so they do not share train.py's index plumbing (subset positions, the sampler's
indices, the tables, their all-reduce across ranks, the lookup): a misalignment anywhere in
it trains on the wrong clusters with a finite loss, and fails here.

On gloo there is no SyncBatchNorm and each rank draws its own augmentations, so the weights
of 2 ranks after training cannot equal one process's: what must hold instead is checked, the
first clustering equal to one process's, the replicas bit-identical after every epoch
(gradient sync), the merged mixture the same on every rank (rank 0's merge, broadcast), and
the logged losses the mean over every rank's steps (the meters' all-reduce).
"""

import json
import os

import pytest
import torch

import spy
from conftest import needs_fmnist, torchrun

# 120 of the folder's 200 images (a seeded subset: IndexedSubset's positions), 16 px, batches
# of 24: 5 steps an epoch on 1 rank and on 2 (12 each); feature batches of 40: rank 0 embeds
# two of the three, rank 1 one. Merging at lambda 0.5 merges in both epochs.
FLAGS = ["--data", "folder", "--subset", "120", "--batch-size", "24", "--img-size", "16", "--epochs", "2",
         "--workers", "0", "--proj-hidden", "32", "--pred-hidden", "32", "--dim", "16", "--pca-dim", "8",
         "--num-clusters", "12", "--feature-batch-size", "40", "--merge-lambda", "0.5", "--soft-k", "3",
         "--tau", "0.2"]
S, TAU = 3, 0.2


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(sorted_folder, tmp_path_factory):
    """The same run on one process (in this one) and on two (torchrun), recorded."""
    d = tmp_path_factory.mktemp("epoch")
    flags = FLAGS + ["--data-dir", sorted_folder]
    with pytest.MonkeyPatch.context() as mp:
        one = spy.run(flags + ["--out-dir", str(d / "one")], mp.setattr)
    res = torchrun("tests/spy.py", [str(d / "spy")] + flags + ["--out-dir", str(d / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    return {"one": ([one], read_log(d / "one")), "two": (spy.by_rank(str(d / "spy"), 2), read_log(d / "two"))}


def expected_rows(z, mix, s=S, tau=TAU, prior=False):
    """Eq. 8 / 10 by hand, in float64: the s nearest centroids by cosine and their weights
    (with log pi_k = log n_k / N added to the logits for --assign-prior)."""
    cos = z.double() @ mix["centroids"].double().T
    top = cos.topk(s, dim=1)
    logits = mix["kappa"].double()[top.indices] * top.values / tau
    if prior:
        logits = logits + (mix["counts"].double() / mix["counts"].sum()).log()[top.indices]
    return top.indices, torch.softmax(logits, dim=1)


def check_every_step(ranks, per_rank_batch, **flags):
    """Each step's nbr / w rows against the expected rows of the files it read."""
    checked = 0
    for epoch in range(len(ranks[0]["feats"])):
        z_of = {}     # file -> this epoch's feature-pass embedding, from every rank's share
        for rec in ranks:
            files = [f for kind, e, f in rec["fetch"] if kind == "features" and e == epoch]
            assert len(files) == len(rec["feats"][epoch])
            z_of.update(zip(files, rec["feats"][epoch]))
        assert len(z_of) == 120                                   # every image embedded once over the ranks
        mix = ranks[0]["mixture"][epoch]
        for rec in ranks:
            files = [f for kind, e, f in rec["fetch"] if kind == "train" and e == epoch]
            steps = [s for s in rec["steps"] if s["epoch"] == epoch]
            assert len(steps) == 5 and len(files) == 5 * per_rank_batch
            for j, step in enumerate(steps):
                z = torch.stack([z_of[f] for f in files[j * per_rank_batch:(j + 1) * per_rank_batch]])
                nbr, w = expected_rows(z, mix, **flags)
                assert torch.equal(step["nbr"], nbr), (epoch, j)
                assert torch.allclose(step["w"].double(), w, atol=1e-5), (epoch, j)
                checked += 1
    return checked


@needs_fmnist
def test_each_step_trains_on_its_own_images_assignment_on_one_process(runs):
    ranks, _ = runs["one"]
    assert check_every_step(ranks, 24) == 10


@needs_fmnist
def test_each_step_trains_on_its_own_images_assignment_on_two_ranks(runs):
    """Half of each rank's batch was embedded by the other rank: its rows come through the
    tables' all-reduce (cluster._share_rows)."""
    ranks, _ = runs["two"]
    assert check_every_step(ranks, 12) == 20


@needs_fmnist
def test_two_ranks_cluster_as_one_process_before_training(runs):
    """The first E-step comes before any training step: the same features on 1 or 2
    processes (each embeds its share), so the same mixture."""
    one, two = runs["one"][0][0]["mixture"][0], runs["two"][0][0]["mixture"][0]
    assert torch.allclose(one["centroids"], two["centroids"], atol=1e-5)
    assert torch.allclose(one["kappa"], two["kappa"], rtol=1e-4)


@needs_fmnist
def test_replicas_stay_identical_through_training_and_merging(runs):
    """After every epoch both ranks hold bit-identical parameters (DDP's gradient all-reduce)
    and the same merged mixture (rank 0 merges, broadcast_object_list sends it)."""
    (r0, r1), log = runs["two"]
    assert sum(r["merged"] for r in log) > 0                  # the comparison covers real merges
    assert [r["K"] for r in log] == [len(e["mixture"]["centroids"]) for e in r0["epochs"]]
    for e0, e1 in zip(r0["epochs"], r1["epochs"]):
        assert e0["params"] == e1["params"]
        for k, v in e0["mixture"].items():
            assert torch.equal(v, e1["mixture"][k]), k


@needs_fmnist
@pytest.mark.parametrize("world", ["one", "two"])
def test_logged_losses_are_the_mean_over_every_rank_s_steps(runs, world):
    ranks, log = runs[world]
    for epoch, rec in enumerate(log):
        steps = [s for r in ranks for s in r["steps"] if s["epoch"] == epoch]
        for field, key in (("loss", "loss"), ("loss_inst", "inst"), ("loss_clus", "clus")):
            mean = sum(s[key] for s in steps) / len(steps)
            assert rec[field] == pytest.approx(mean, rel=1e-5, abs=1e-7), (epoch, field)


@needs_fmnist
@pytest.mark.parametrize("flags, expect", [(["--soft-k", "1"], dict(s=1)),                 # Table 6: hard (eq. 8)
                                           (["--assign-prior", "--tau", "1.0"], dict(prior=True, tau=1.0))])
def test_assignment_flags_reach_the_loss(sorted_folder, tmp_path, flags, expect):
    """--soft-k 1 is the hard assignment (one centroid, weight 1); --assign-prior adds log pi_k
    to eq. 10's logits; --tau sets its temperature: each row that reached the loss is the
    hand-computed one with those settings."""
    with pytest.MonkeyPatch.context() as mp:
        rec = spy.run(FLAGS + ["--data-dir", sorted_folder, "--out-dir", str(tmp_path / "o")] + flags, mp.setattr)
    assert check_every_step([rec], 24, **expect) == 10
    if expect.get("s") == 1:
        assert all(torch.equal(s["w"], torch.ones(24, 1)) for s in rec["steps"])
