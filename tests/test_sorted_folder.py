"""The ImageNet path on data listed class by class, as torchvision's ImageFolder lists
ImageNet: the feature pass and evaluate.py must not cut it into single-class batches (with
batch-statistics BN each batch would lose its class's mean, the signal the mixture must
find), and the ImageNet preset must train, resume and evaluate under torchrun on it."""

import json
import os
import shutil
import types

import pytest
import torch

import data
import evaluate as ev
import train
import utils
from conftest import needs_fmnist, torchrun, write_class_folder
from model import ModelConfig

CPU = torch.device("cpu")


def pass_args(**kw):
    """The flags data.feature_loader / train.feature_pass read, for one process."""
    return types.SimpleNamespace(**(dict(feature_batch_size=40, rank=0, world_size=1, seed=0, workers=0, device=CPU,
                                         master=False, data="folder", amp="none", feature_amp="none", feature_bn="batch",
                                         local_group=None, dim=16) | kw))


@needs_fmnist
def test_feature_pass_batches_mix_the_classes_of_a_sorted_folder(sorted_folder):
    """200 images, 4 classes of 50 in a row: consecutive batches of 40 would be 80-100% one
    class; cut from the seeded permutation each holds the data set's mix, on 1 or 2 ranks."""
    ds = data.load_dataset("folder", sorted_folder, "train", data.eval_transform("folder", 16))
    assert ds.targets == sorted(ds.targets)                     # the folder really is class-sorted
    for world in (1, 2):
        seen = []
        for rank in range(world):
            for _, y, idx in data.feature_loader(ds, 40, pass_args(rank=rank, world_size=world)):
                assert torch.bincount(y).max().item() / len(y) < 0.6, (world, rank, y.tolist())
                seen += idx.tolist()
        assert sorted(seen) == list(range(len(ds)))             # every image exactly once


@needs_fmnist
def test_feature_pass_embeddings_do_not_depend_on_the_file_order(sorted_folder):
    """Each image's momentum embedding from the feature pass is close to the one it gets with
    the whole data set's statistics (one batch of all 200): the batch statistics are the data
    set's, not one class's. Consecutive class-sorted batches of 40 give a mean cosine of 0.72
    here, the permuted cut 0.91."""
    torch.manual_seed(0)
    model = ModelConfig("resnet18", True, 3, 16, 32, 32, 16).build().eval()
    ds = data.load_dataset("folder", sorted_folder, "train", data.eval_transform("folder", 16))
    args = pass_args()
    z, idx = train.feature_pass(model, data.feature_loader(ds, args.feature_batch_size, args), args)
    by_index = torch.zeros_like(z)
    by_index[idx] = z
    everything = torch.stack([ds[i][0] for i in range(len(ds))])
    whole = model.embed(data.to_input(everything, "folder", CPU))
    assert (by_index * whole).sum(1).mean() > 0.8


@needs_fmnist
def test_evaluate_embeds_like_the_feature_pass_and_keeps_the_data_set_order(sorted_folder):
    """evaluate.py's embeddings (its learned-cluster assignment) are cut like the feature
    pass: with the same batch size and seed they are the training's z exactly, and features
    and labels come back in the data set's order."""
    torch.manual_seed(0)
    model = ModelConfig("resnet18", True, 3, 16, 32, 32, 16).build().eval()
    ds = data.load_dataset("folder", sorted_folder, "train", data.eval_transform("folder", 16))
    args = pass_args()
    z, idx = train.feature_pass(model, data.feature_loader(ds, args.feature_batch_size, args), args)
    eargs = ev.get_args(["--backbone", "unused.pth", "--workers", "0", "--feature-batch-size", "40", "--raw-size", "16"])
    eargs.data, eargs.img_size = "folder", 16
    split = ev.extract(ds, model.backbone, lambda x: model.embed(x, "batch"), utils.setup_distributed(eargs))
    assert split.labels.tolist() == ds.targets
    assert torch.equal(split.emb[idx], z.half())
    ordered = torch.stack([ds[i][0] for i in range(8)])         # eval-mode backbone: order-free
    assert torch.allclose(split.feats[:8].float(), model.backbone(data.to_input(ordered, "folder", CPU)), atol=1e-2)
    assert torch.equal(split.raw[:8], ordered.flatten(1))      # raw pixels of the same view, in order


def read_log(out, drop=("time", "images_per_s")):
    """log.jsonl without its timings (which differ between two runs of the same computation)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


@needs_fmnist
def test_imagenet_preset_under_torchrun_on_a_sorted_jpeg_folder(tmp_path):
    """The ImageNet preset (ResNet-50, LARS with warm-up, K0, PCA kappa, merging), changed in
    image size (32 px: every path below is the same at 224), batch, K0, head width and
    epochs, on 4 classes x 4 real JPEGs listed class by class, on 2 gloo processes: a run
    stopped after epoch 1 and resumed ends bit-identical to the uninterrupted run (weights,
    optimiser, mixture, every rank's RNG, the log), and evaluate.py measures the checkpoint
    on 2 processes exactly as on one."""
    folder = write_class_folder(tmp_path / "imgs", 4, 2, classes=4, fmt="jpg", size=64)
    flags = ["--preset", "imagenet-100ep", "--data-dir", folder, "--img-size", "32", "--batch-size", "8",
             "--num-clusters", "6", "--proj-hidden", "64", "--pred-hidden", "64", "--epochs", "2",
             "--warmup-epochs", "1", "--feature-batch-size", "8", "--workers", "0"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    for argv in (["--out-dir", full], ["--out-dir", part, "--stop-after-epoch", "1"],
                 ["--out-dir", part, "--resume", "auto"]):
        res = torchrun("train.py", flags + argv)
        assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    a = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(part, "checkpoint.pth"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and len(b["rng"]) == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["mu"], b["optimizer"]["state"][k]["mu"]), k     # LARS's momentum buffers
    for k in ("centroids", "counts", "kappa"):
        assert torch.equal(a["mixture"][k], b["mixture"][k]), k
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))
    assert read_log(full) == read_log(part)
    # evaluate.py, Table 3's command, on 2 processes (each embeds its share) and on one
    eval_flags = ["--checkpoint", os.path.join(full, "checkpoint.pth"), "--workers", "0", "--probe-epochs", "2",
                  "--grid-clusters", "2", "--kmeans-redo", "1", "--feature-batch-size", "4", "--knn-k", "5"]
    res = torchrun("evaluate.py", eval_flags + ["--out-dir", str(tmp_path / "e2")])
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "e2" / "results.json") as f:
        two_procs = json.load(f)
    out = ev.main(eval_flags + ["--out-dir", str(tmp_path / "e1")])
    assert out["split"]["train"] == 16 and out["split"]["test"] == 8 and out["backbone_unchanged"]
    assert out["learned_clusters"]["K_mixture"] == len(a["mixture"]["centroids"])
    assert two_procs["device"] == "2 x cpu" and two_procs["knn"] == out["knn"]
    assert two_procs["learned_clusters"] == out["learned_clusters"] and two_procs["raw_pixels"] == out["raw_pixels"]


@needs_fmnist
def test_the_feature_pass_reads_a_resized_copy_that_lists_the_same_images(sorted_folder, tmp_path, capsys):
    """train.py --feature-data-dir: a copy made by data.resized_copy (here to 20 px, from 28)
    trains; a copy missing an image stops at the start with one line."""
    copy = str(tmp_path / "copy")
    assert data.resized_copy(sorted_folder, copy, side=20, workers=1) == 240
    img = data.load_image(os.path.join(copy, os.path.relpath(data.ImageFolder(os.path.join(sorted_folder, "train"))
                                                              .samples[0][0], sorted_folder)))
    assert img.size == (20, 20)
    flags = ["--data", "folder", "--data-dir", sorted_folder, "--subset", "0", "--batch-size", "40", "--epochs", "1",
             "--img-size", "16", "--workers", "0", "--proj-hidden", "32", "--pred-hidden", "32", "--dim", "16",
             "--num-clusters", "12", "--feature-data-dir", copy]
    train.main(flags + ["--out-dir", str(tmp_path / "ok")])
    assert json.loads(open(tmp_path / "ok" / "log.jsonl").readline())["K"] > 0
    first = sorted(os.listdir(os.path.join(copy, "train")))[0]
    gone = sorted(os.listdir(os.path.join(copy, "train", first)))[3]
    os.remove(os.path.join(copy, "train", first, gone))
    capsys.readouterr()
    try:
        train.main(flags + ["--out-dir", str(tmp_path / "bad")])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: --feature-data-dir") and "does not hold the same images" in err


@needs_fmnist
@pytest.mark.parametrize("fault, needle", [("side 4", "too small for the 16 px view"),
                                           ("replaced", "is not a copy of")])
def test_a_feature_copy_too_small_or_of_other_images_is_refused(fault, needle, sorted_folder, tmp_path, capsys):
    """The copy's names and order are right, but it was made at --side 4 for 16 px views, or
    its images were swapped for others (class 0's files hold class 1's pictures)."""
    copy = str(tmp_path / "copy")
    data.resized_copy(sorted_folder, copy, side=4 if fault == "side 4" else 256, workers=1)
    if fault == "replaced":
        a, b = sorted(os.listdir(os.path.join(copy, "train")))[:2]
        for name, other in zip(sorted(os.listdir(os.path.join(copy, "train", a))),
                               sorted(os.listdir(os.path.join(copy, "train", b)))):
            shutil.copy(os.path.join(copy, "train", b, other), os.path.join(copy, "train", a, name))
    flags = ["--data", "folder", "--data-dir", sorted_folder, "--subset", "0", "--batch-size", "40", "--epochs", "1",
             "--img-size", "16", "--workers", "0", "--num-clusters", "12", "--feature-data-dir", copy,
             "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        train.main(flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: --feature-data-dir") and needle in err
