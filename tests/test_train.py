"""train.py end to end on a small real Fashion-MNIST subset (CPU): the epoch loop, the log,
merging, torchrun DDP against one process, exact resume, and the one-line errors."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

import run_safety
import train
import utils
from conftest import TORCHRUN_ENV, free_port, torchrun, torchrun_cmd

# A run small enough for 2 CPU cores: 128 real images at 16 px, tiny heads, 2 epochs.
TINY = ["--subset", "128", "--batch-size", "32", "--img-size", "16", "--epochs", "2", "--workers", "0",
        "--proj-hidden", "32", "--pred-hidden", "32", "--dim", "16", "--pca-dim", "8", "--num-clusters", "24"]


def run(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    train.main(TINY + ["--out-dir", out] + list(extra))
    return out


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_epochs_write_checkpoint_and_log_and_merge(tmp_path):
    out = run(tmp_path, "--merge-lambda", "0.5")
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:  # every field a user plots or greps for
        for k in ("loss", "loss_inst", "loss_clus", "lr", "momentum", "K", "merged", "dropped_empty", "cluster_max",
                  "kappa_min", "kappa_max", "images_per_s"):
            assert k in r
        assert set(r["time"]) >= {"features", "clustering", "training", "merging", "epoch"}
    assert sum(r["merged"] for r in log) > 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (128 // 32)
    hist = ckpt["mixture"]["k_history"]
    assert hist == [r["K"] for r in log]
    assert hist[-1] < 24                    # K falls: merging (and dropped empty clusters)
    assert not os.path.exists(os.path.join(out, "checkpoint.pth.tmp"))


def test_no_merge_keeps_k_and_merge_reduces_it(tmp_path):
    fixed = read_log(run(tmp_path, "--no-merge", "--epochs", "1", name="fixed"))
    merged = read_log(run(tmp_path, "--merge-lambda", "0.0", "--epochs", "1", name="merged"))
    assert fixed[0]["merged"] == 0
    assert merged[0]["merged"] > 0
    assert merged[0]["K"] == fixed[0]["K"] - merged[0]["merged"]   # same first clustering, then merges


@pytest.mark.parametrize("workers", ["0", "1"])   # 1: worker processes, the feature pass's persistent
def test_resume_matches_uninterrupted_run(tmp_path, capsys, workers):
    full = run(tmp_path, "--workers", workers, name="full")
    part = run(tmp_path, "--workers", workers, "--stop-after-epoch", "1", name="part")
    assert read_log(part)[-1]["epoch"] == 1
    capsys.readouterr()
    train.main(TINY + ["--out-dir", part, "--resume", "auto", "--workers", workers, "--save-every", "5"])
    assert "note:" not in capsys.readouterr().out   # where a process runs is no change to note
    a = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(part, "checkpoint.pth"), weights_only=False)
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["mixture"]["centroids"], b["mixture"]["centroids"])
    assert [r["loss"] for r in read_log(full)] == [r["loss"] for r in read_log(part)]


# ----------------------------------------------------------------------------- the ablations take effect
def test_instance_loss_none_trains_on_the_cluster_term_alone(tmp_path):
    """Table 4, 'SiamMM w/o i': eq. 12 is off (0 in every epoch) and the loss is the cluster term."""
    for r in read_log(run(tmp_path, "--instance-loss", "none", "--cluster-weight", "0.5", name="none")):
        assert r["loss_inst"] == 0.0 and r["loss_clus"] != 0.0
        assert r["loss"] == pytest.approx(0.5 * r["loss_clus"], rel=1e-6)


def test_instance_and_cluster_loss_variants_take_effect(tmp_path):
    """Every run here draws the same numbers (same seed, one process), so a flag that did
    nothing would log the default's loss to the last bit. Table 4's InfoNCE (MoCo v3) is
    also out of eq. 12's range [0, 4] (2T ln B ~ 6.9 at T = 1, B = 32); Table 8's eq. 14 and
    15 are cross-entropies, each its own value."""
    default = read_log(run(tmp_path, "--epochs", "1", name="default"))[0]
    assert 0 <= default["loss_inst"] <= 4
    infonce = read_log(run(tmp_path, "--epochs", "1", "--instance-loss", "infonce", name="infonce"))[0]
    assert infonce["loss_inst"] > 4
    neg = {v: read_log(run(tmp_path, "--epochs", "1", "--cluster-loss", v, name=v))[0]
           for v in ("neg-centroids", "neg-instances")}
    for r in neg.values():
        assert r["loss_clus"] > 0 and r["loss_clus"] != default["loss_clus"]
    assert neg["neg-centroids"]["loss_clus"] != neg["neg-instances"]["loss_clus"]


def test_kappa_flags_take_effect(tmp_path):
    """Table 7: --kappa-estimator const makes every kappa 1; eq. 7 (banerjee) and eq. 16 (pca) fit the same
    first clustering (it comes before any training step) but estimate different kappa."""
    const = run(tmp_path, "--epochs", "1", "--kappa-estimator", "const", name="const")
    mix = torch.load(os.path.join(const, "checkpoint.pth"), weights_only=False)["mixture"]
    assert torch.equal(mix["kappa"], torch.ones(len(mix["centroids"])))
    assert read_log(const)[0]["kappa_min"] == read_log(const)[0]["kappa_max"] == 1.0
    fits = {}
    for mode in ("banerjee", "pca"):
        out = run(tmp_path, "--epochs", "1", "--kappa-estimator", mode, "--no-merge", name=mode)
        fits[mode] = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)["mixture"]
    assert torch.equal(fits["banerjee"]["centroids"], fits["pca"]["centroids"])
    assert (fits["banerjee"]["kappa"] - fits["pca"]["kappa"]).abs().max() > 1.0


def test_cluster_warmup_epochs_train_on_eq_12_alone(tmp_path):
    """The first epoch has no E-step (no K logged) and no cluster term; the second has both."""
    log = read_log(run(tmp_path, "--cluster-warmup-epochs", "1", name="warm"))
    assert "K" not in log[0] and log[0]["loss_clus"] == 0.0 and log[0]["loss"] == log[0]["loss_inst"]
    assert "K" in log[1] and log[1]["loss_clus"] != 0.0


def test_reinit_centroids_starts_k_means_afresh_every_epoch(tmp_path):
    """Sec. 4.3 against the Table 7 ablation: with one warm-started Lloyd iteration an epoch,
    epoch 2 runs exactly that one; re-initialised, it runs a fresh k-means from a random
    start, which takes more than one iteration to converge."""
    warm = read_log(run(tmp_path, "--kmeans-iters", "1", "--no-merge", name="warm"))
    fresh = read_log(run(tmp_path, "--kmeans-iters", "1", "--no-merge", "--reinit-centroids", "--nredo", "2",
                         name="fresh"))
    assert warm[1]["kmeans_iters"] == 1
    assert fresh[1]["kmeans_iters"] > 1


# ----------------------------------------------------------------------------- schedules and optimisers (sec. 5.1)
def test_lr_schedule_is_linear_warmup_then_half_cosine():
    """lr = base_lr x batch / 256 (Goyal et al.; MoCo v3), linear from 0 over the warm-up, then
    half a cosine to 0: hand-computed values at the ImageNet preset's settings."""
    args = train.get_args(["--preset", "imagenet-100ep"])          # lr 0.6, batch 4096, 10 warm-up of 100
    peak = 0.6 * 4096 / 256                                         # 9.6
    for t, want in ((0, 0.0), (2.5, peak / 4), (5, peak / 2), (10, peak), (55, peak / 2), (70, peak / 4),
                    (100, 0.0)):
        assert train.lr_at(t, args) == pytest.approx(want, abs=1e-12), t
    cpu = train.get_args([])                                         # no warm-up: the peak at t = 0
    assert train.lr_at(0, cpu) == pytest.approx(0.06 * 128 / 256)
    assert train.lr_at(cpu.epochs / 2, cpu) == pytest.approx(0.06 * 128 / 256 / 2)


def lars_step(w, g, buf, lr, wd, momentum=0.9, eta=0.001):
    """One LARS step by hand (numpy, float64), MoCo v3's rule: weight decay and the trust
    ratio eta ||w|| / ||g + wd w|| for matrices only; momentum on the scaled update."""
    if w.ndim > 1:
        d = g + wd * w
        d = d * (eta * np.linalg.norm(w) / np.linalg.norm(d))
    else:
        d = g
    buf = momentum * buf + d
    return w - lr * buf, buf


def test_lars_matches_hand_computed_steps_and_leaves_1d_parameters_alone():
    w0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    b0 = np.array([0.3, -0.7])
    grads = [(np.array([[0.2, 0.1], [-0.4, 0.3]]), np.array([0.05, -0.1])),
             (np.array([[-0.1, 0.5], [0.2, 0.2]]), np.array([0.2, 0.0]))]
    w = torch.nn.Parameter(torch.tensor(w0))
    b = torch.nn.Parameter(torch.tensor(b0))
    opt = train.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9)
    ew, eb, bw, bb = w0, b0, np.zeros_like(w0), np.zeros_like(b0)
    for gw, gb in grads:
        w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        ew, bw = lars_step(ew, gw, bw, 0.5, 0.1)
        eb, bb = lars_step(eb, gb, bb, 0.5, 0.1)
        np.testing.assert_allclose(w.detach().numpy(), ew, rtol=1e-12)
        np.testing.assert_allclose(b.detach().numpy(), eb, rtol=1e-12)
    # a zero gradient: a matrix still decays (scaled by the trust ratio), a vector does not move
    w.grad, b.grad = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    opt.state.clear()
    before_w, before_b = w.detach().clone(), b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before_b)
    assert not torch.equal(w.detach(), before_w)
    z = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))  # ||w|| = 0: trust ratio 1, no NaN
    z.grad = torch.ones(2, 2, dtype=torch.float64)
    train.LARS([z], lr=0.5, weight_decay=0.1).step()
    assert torch.equal(z.detach(), torch.full((2, 2), -0.5, dtype=torch.float64))


def test_sgd_decays_matrices_only_and_scales_the_lr_by_the_batch():
    """SimSiam's SGD for small batches: weight decay on conv and linear weights only, never on
    BN parameters and biases (as LARS); lr = --lr x batch / 256."""
    from model import ModelConfig
    args = train.get_args(["--lr", "0.1", "--batch-size", "64", "--weight-decay", "0.5"])
    model = ModelConfig("resnet18", True, 1, 8, 32, 32, 16).build()
    opt = train.build_optimizer(model.online_parameters(), args)
    assert all(g["lr"] == pytest.approx(0.1 * 64 / 256) for g in opt.param_groups)
    held = sorted(id(p) for g in opt.param_groups for p in g["params"])
    assert held == sorted(id(p) for p in model.online_parameters())   # every online parameter, once
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    for name, p in model.named_parameters():
        if not name.startswith("momentum_"):
            assert (id(p) in decay) == (p.ndim > 1), name
    for p in model.online_parameters():                     # one step on a zero gradient
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if n.startswith("momentum_"):
            continue
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (p.ndim > 1 and bool(before[n].abs().sum() > 0)), n


# ----------------------------------------------------------------------------- bad input
def error_line(capsys, argv):
    """Run train.py's main, expect exit status 2 and exactly one error line, the last one
    on stderr (tqdm bars of the epochs before the error also go to stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert sum("error" in l for l in err) == 1 and err[-1].startswith("train.py: error: ")
    return err[-1]


def test_missing_data_path(tmp_path, capsys):
    msg = error_line(capsys, TINY + ["--data-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")])
    assert "does not exist" in msg


def test_data_dir_that_is_a_file_and_pca_dim_above_dim(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    msg = error_line(capsys, TINY + ["--data-dir", str(tmp_path / "f"), "--out-dir", str(tmp_path / "o")])
    assert "is a file" in msg
    msg = error_line(capsys, TINY + ["--pca-dim", "32", "--out-dir", str(tmp_path / "o")])   # TINY: --dim 16
    assert "--pca-dim 32 is larger than --dim 16" in msg


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    msg = error_line(capsys, TINY + ["--data", "folder", "--data-dir", str(tmp_path / "imgs"), "--out-dir", str(tmp_path / "o")])
    assert "no images" in msg


def test_unreadable_image_is_named(tmp_path, capsys):
    from PIL import Image
    cls = tmp_path / "imgs" / "train" / "a"
    cls.mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (20, 20), (i * 5, 0, 0)).save(cls / f"{i}.png")
    (cls / "broken.png").write_bytes(b"not a png")
    msg = error_line(capsys, ["--data", "folder", "--data-dir", str(tmp_path / "imgs"), "--batch-size", "8",
                              "--num-clusters", "4", "--img-size", "16", "--workers", "0", "--dim", "16",
                              "--proj-hidden", "16", "--pred-hidden", "16", "--epochs", "1", "--out-dir", str(tmp_path / "o")])
    assert "broken.png" in msg


def test_too_many_clusters_and_too_large_batch(tmp_path, capsys):
    msg = error_line(capsys, TINY + ["--num-clusters", "500", "--out-dir", str(tmp_path / "o")])
    assert "--num-clusters 500" in msg
    msg = error_line(capsys, TINY + ["--batch-size", "256", "--out-dir", str(tmp_path / "o")])
    assert "--batch-size 256" in msg


def test_nothing_to_train_on(tmp_path, capsys):
    msg = error_line(capsys, TINY + ["--instance-loss", "none", "--cluster-weight", "0", "--out-dir", str(tmp_path / "o")])
    assert "--instance-loss none" in msg


def test_incompatible_resume(tmp_path, capsys):
    out = run(tmp_path, "--epochs", "1", name="r")
    msg = error_line(capsys, TINY + ["--out-dir", out, "--resume", "auto", "--dim", "32"])
    assert "--dim" in msg
    msg = error_line(capsys, TINY + ["--out-dir", out, "--resume", "auto", "--width", "8"])
    assert "--width 16" in msg                                  # the CPU preset's width, saved in the checkpoint
    assert "--width 0" in error_line(capsys, TINY + ["--out-dir", str(tmp_path / "w0"), "--width", "0"])
    # the channels come from the data: a grayscale model does not resume on RGB images
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert ckpt["model_config"]["in_chans"] == 1
    ckpt["model_config"]["in_chans"] = 3
    torch.save(ckpt, os.path.join(out, "checkpoint.pth"))
    assert "--data (its channels) 3, this run has 1" in error_line(capsys, TINY + ["--out-dir", out, "--resume", "auto"])


def test_resume_notes_every_changed_training_flag(tmp_path, capsys):
    """Only the model must match on resume; other flags come from the new command line
    (MoCo v3), and a run that takes another lambda or length from there says so."""
    out = run(tmp_path, "--epochs", "3", "--stop-after-epoch", "1", name="n")
    capsys.readouterr()
    train.main(TINY + ["--out-dir", out, "--resume", "auto", "--epochs", "3", "--stop-after-epoch", "2",
                       "--merge-lambda", "0.5"])
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note:"))
    assert "from epoch 2 on" in note and "--merge-lambda 0.5 (was 1.625)" in note
    assert "--stop-after-epoch" not in note and "--epochs" not in note   # run flags, and the same length


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1", name="nan")
    before = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    msg = error_line(capsys, TINY + ["--out-dir", out, "--resume", "auto", "--lr", "1e30"])
    assert "diverged" in msg
    after = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert after["epoch"] == 1
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k])


def test_presets_set_defaults_and_flags_win():
    """A preset fills every flag left unset; a flag on the command line wins. eq. 11's lambda
    is per preset (the paper tunes it per data set, sec. 5.1)."""
    cpu = train.get_args([])
    assert (cpu.preset, cpu.arch, cpu.width, cpu.merge_lambda) == ("cpu", "resnet18", 16, 1.625)
    inet = train.get_args(["--preset", "imagenet-100ep"])
    assert (inet.arch, inet.batch_size, inet.num_clusters, inet.merge_lambda) == ("resnet50", 4096, 100000, 2.0)
    mine = train.get_args(["--preset", "imagenet-200ep", "--merge-lambda", "1.5", "--width", "32"])
    assert (mine.merge_lambda, mine.width, mine.epochs) == (1.5, 32, 200)
    assert all(getattr(cpu, k) is not None for k in train.PRESETS["cpu"])


def test_feature_batches_cover_every_sample_once_and_never_a_single_image():
    import data
    for n, b, w in [(128, 32, 1), (128, 48, 2), (129, 32, 3), (33, 32, 1), (5, 32, 8), (1000, 256, 8)]:
        shards = [data.feature_batches(n, b, r, w) for r in range(w)]
        got = sorted(i for s in shards for batch in s for i in batch)
        assert got == list(range(n))
        assert all(len(batch) >= 2 for s in shards for batch in s)
        # the cut does not depend on the world size: the same batches, dealt out
        one = data.feature_batches(n, b)
        assert sorted(map(tuple, (batch for s in shards for batch in s))) == sorted(map(tuple, one))


def test_blur_is_sized_for_the_image():
    """The MoCo v3 blur's sigma (0.1-2.0 px at 224 px) scales with the view size: at 224 px it
    is the paper's blur, at 32 px it must leave a Fashion-MNIST image almost untouched
    (an unscaled 2 px blur at 32 px erases the garment's texture)."""
    import numpy as np
    from PIL import Image

    import data
    img = Image.fromarray((torch.rand(32, 32) * 255).to(torch.uint8).numpy())
    x = torch.tensor(np.asarray(img), dtype=torch.float32)

    def change(scale):
        torch.manual_seed(0)
        y = torch.tensor(np.asarray(data.GaussianBlur(scale)(img)), dtype=torch.float32)
        return (y - x).abs().mean().item()
    assert change(32 / 224) < 0.1 * change(1.0)
    assert change(1.0) > 20          # the unscaled blur really does smear a noise image
    view = data.moco_v3_view(32, 1.0, 0.0)
    blurs = [t for a in view.transforms if hasattr(a, "transforms") for t in a.transforms
             if isinstance(t, data.GaussianBlur)]
    assert [b.scale for b in blurs] == [32 / 224]


# ----------------------------------------------------------------------------- the GPU path, as far as a CPU shows it
def test_rng_state_saves_and_restores_this_rank_s_gpu_only(monkeypatch):
    """A checkpoint saved where rank 5 saw 8 GPUs resumes where one GPU is visible: each rank
    asks torch for its own device's CUDA generator only (the every-device calls raised
    IndexError on the smaller node). No GPU here: torch.cuda's generator calls are replaced
    by recorders of the device they are asked for."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": asked.append(("get", device)) or "state")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": asked.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every visible GPU"))
    state = utils.rng_state(torch.device("cuda", 5))
    utils.set_rng_state(state, torch.device("cuda", 0))
    assert asked == [("get", torch.device("cuda", 5)), ("set", torch.device("cuda", 0))]
    utils.set_rng_state(utils.rng_state(torch.device("cpu")), torch.device("cpu"))
    assert len(asked) == 2                                   # a CPU process never touches CUDA's generator


def test_loss_sums_let_fp16_skip_a_step_but_not_diverge():
    """GradScaler skips an fp16 step whose loss or gradients are not finite: one such step
    must not end the run (it used to, through the divergence check) nor enter the means;
    20 in a row are divergence. Without a scaler one non-finite loss is."""
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    m = run_safety.LossSums(torch.device("cpu"), skips_allowed=True)
    for loss in (one, nan, one * 3):
        m.add(loss, loss.clone(), torch.tensor(0.0), loss / 4)
    assert m.check() is None and m.means() == [2.0, 2.0, 0.0, 0.5]
    for _ in range(20):
        m.add(nan, nan, nan, nan)
    assert "20 steps in a row" in m.check()
    strict = run_safety.LossSums(torch.device("cpu"))
    strict.add(one, one, one, one)
    strict.add(nan, nan, nan, nan)
    assert "1 of the last 2 steps" in strict.check()


def test_nodes_without_a_shared_out_dir_stop_with_one_line(tmp_path):
    """Two 'nodes' (two torchrun agents, --nnodes 2) run in different folders with the same
    relative --out-dir: node 0 finds a checkpoint, node 1 none. Before, node 1's rank started
    from scratch while rank 0 resumed; now both stop and say why."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    run(node0, "--epochs", "2", "--stop-after-epoch", "1", name="shared")
    port = free_port()
    procs = []
    for rank, cwd in enumerate((node0, node1)):
        cmd = torchrun_cmd("train.py", TINY + ["--epochs", "2", "--out-dir", "shared", "--resume", "auto"], nproc=1,
                           launcher=["--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"])
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=TORCHRUN_ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0
        assert "train.py: error: the ranks see different checkpoints" in err and "rank 1: none" in err, err[-2000:]


def test_fp16_resume_from_a_checkpoint_without_scaler_state():
    """A bf16, fp32 or CPU run saves an empty GradScaler state; resuming it with --amp fp16
    (an enabled scaler) used to raise "The source state dict is empty"."""
    from cluster import VMFMixture
    import dataclasses
    args = train.get_args(TINY)
    args.rank, args.master, args.device = 0, False, torch.device("cpu")
    cfg = train.model_config(args)
    model = cfg.build()
    opt = train.build_optimizer(model.online_parameters(), args)
    ckpt = {"args": vars(args), "model_config": dataclasses.asdict(cfg), "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "mixture": None, "epoch": 3,
            "rng": [utils.rng_state(torch.device("cpu"))]}
    assert ckpt["scaler"] == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)          # what an fp16 run builds (on CUDA)
    start = train.resume(ckpt, "ckpt.pth", model, opt, scaler, VMFMixture(16, 24), args)
    assert start == (3, None) and scaler.get_scale() == 65536.0          # a fresh scaler, its default scale
