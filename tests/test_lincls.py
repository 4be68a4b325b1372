"""lincls.py, the paper's Table 1 (MoCo v3's linear protocol) and Table 2 (SimCLR's
semi-supervised fine-tuning): the label subsets, and the protocols end to end on a real
class-sorted image folder, on 1 and 2 gloo processes, stopped and resumed."""

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import lincls
import utils
from conftest import needs_fmnist, torchrun
from model import ModelConfig



def test_balanced_subset_is_class_balanced_seeded_and_nested():
    labels = np.repeat(np.arange(5), [100, 200, 300, 50, 7])
    one, ten = lincls.balanced_subset(labels, 1, seed=3), lincls.balanced_subset(labels, 10, seed=3)
    assert np.bincount(labels[one]).tolist() == [1, 2, 3, 1, 1]       # round(1%), at least one
    assert np.bincount(labels[ten]).tolist() == [10, 20, 30, 5, 1]
    assert set(one) <= set(ten) and len(set(ten)) == len(ten)
    assert np.array_equal(ten, lincls.balanced_subset(labels, 10, seed=3))
    assert not np.array_equal(ten, lincls.balanced_subset(labels, 10, seed=4))


def test_split_file_subset_matches_file_names(tmp_path):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "train" / cls)
        for i in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / "train" / cls / f"{cls}_{i}.JPEG")
    ds = data.load_dataset("folder", str(tmp_path), "train")
    (tmp_path / "1percent.txt").write_text("b_2.JPEG\na_0.JPEG\n")
    idx = lincls.split_file_subset(ds, str(tmp_path / "1percent.txt"))
    assert [os.path.basename(ds.samples[i][0]) for i in idx] == ["a_0.JPEG", "b_2.JPEG"]
    (tmp_path / "bad.txt").write_text("zzz.JPEG\n")
    with pytest.raises(utils.UserError, match="zzz.JPEG"):
        lincls.split_file_subset(ds, str(tmp_path / "bad.txt"))


def test_seeded_views_do_not_depend_on_the_process_rng():
    """An image's augmentation in an epoch is a function of (seed, epoch, index) alone: the
    same in any process or worker, whatever the global RNG state, and different per epoch."""
    img = Image.fromarray((np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28))
    ds = lincls.SeededViews(types_ds([img] * 3), lincls.train_transform(_ns(img_size=16, crop_min=0.08)), seed=0)
    torch.manual_seed(1)
    a = [ds[i][0] for i in range(3)]
    torch.manual_seed(2)
    b = [ds[i][0] for i in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])                      # another image index, another view
    ds.epoch = 1
    assert not torch.equal(ds[0][0], a[0])                  # another epoch, another view
    ds.epoch = 2                                            # (a seed packed above torch's 32 bits
    assert not torch.equal(ds[0][0], a[0])                  # repeated the views every 2 epochs)
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(state, torch.get_rng_state())        # the caller's RNG is left as it was


def _ns(**kw):
    import types
    return types.SimpleNamespace(**kw)


def types_ds(images):
    class DS(torch.utils.data.Dataset):
        targets = [0] * len(images)

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], 0, i
    return DS()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sorted_folder):
    """A train.py-format checkpoint of an untrained narrow resnet18 for 3-channel 16 px images."""
    d = tmp_path_factory.mktemp("pre")
    torch.manual_seed(0)
    cfg = ModelConfig("resnet18", True, 3, 8, 32, 32, 16)
    model = cfg.build()
    targs = dict(data="folder", data_dir=sorted_folder, arch="resnet18", small_stem=True, width=8, img_size=16,
                 proj_hidden=32, pred_hidden=32, dim=16, crop_min=0.2, feature_bn="batch")
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg), "mixture": None, "epoch": 1,
                "args": targs}, d / "checkpoint.pth")
    return d / "checkpoint.pth"


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# 200 train images (4 classes, listed class by class), 40 val; global batch 40: 5 steps an epoch
FLAGS = ["--batch-size", "40", "--epochs", "3", "--workers", "0", "--lr", "0.5"]


@needs_fmnist
def test_linear_protocol_two_processes_equal_one_resume_exactly_and_keep_the_backbone(pretrained, tmp_path):
    one, two, part = (str(tmp_path / n) for n in ("one", "two", "part"))
    res = lincls.main(["--checkpoint", str(pretrained), "--out-dir", one] + FLAGS)
    out = torchrun("lincls.py", ["--checkpoint", str(pretrained), "--out-dir", two] + FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    a = torch.load(os.path.join(one, "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(two, "checkpoint.pth"), weights_only=False)
    # the same views, the same global batches: the fc of 2 processes is the fc of 1
    assert torch.allclose(a["model"]["fc.weight"], b["model"]["fc.weight"], atol=1e-5)
    assert torch.allclose(a["model"]["fc.bias"], b["model"]["fc.bias"], atol=1e-5)
    with open(os.path.join(two, "results.json")) as f:
        two_res = json.load(f)
    assert two_res["top1"] == pytest.approx(res["top1"]) and two_res["processes"] == 2
    # the backbone is bit-identical to the pre-trained one (MoCo v3's sanity check, in the file)
    pre = torch.load(pretrained, weights_only=False)["model"]
    for k, v in a["model"].items():
        if not k.startswith("fc."):
            assert torch.equal(v, pre["backbone." + k]), k
    # stopped after epoch 1 and resumed: the uninterrupted run's fc, exactly
    lincls.main(["--checkpoint", str(pretrained), "--out-dir", part, "--stop-after-epoch", "1"] + FLAGS)
    lincls.main(["--checkpoint", str(pretrained), "--out-dir", part, "--resume", "auto"] + FLAGS)
    c = torch.load(os.path.join(part, "checkpoint.pth"), weights_only=False)
    assert torch.equal(a["model"]["fc.weight"], c["model"]["fc.weight"])
    with open(os.path.join(part, "log.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]
    # main_lincls's schedule: lr x batch / 256, half-cosine, set once per epoch (not per step)
    log = read_log(one)
    base = 0.5 * 40 / 256
    assert [r["lr"] for r in log] == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])
    assert res["top1"] == log[-1]["top1"] and res["best_top1"] == max(r["top1"] for r in log)


@needs_fmnist
def test_semi_supervised_finetuning_under_torchrun(pretrained, tmp_path):
    """Table 2's protocol on 2 gloo processes: 10% of the labels (5 per class here), the
    whole network trained, top-1 / top-5 on val."""
    out_dir = str(tmp_path / "ft")
    out = torchrun("lincls.py", ["--checkpoint", str(pretrained), "--out-dir", out_dir, "--mode", "finetune",
                                 "--labels", "10", "--epochs", "2", "--batch-size", "8", "--workers", "0"])
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(out_dir, "results.json")) as f:
        res = json.load(f)
    assert res["mode"] == "finetune" and res["labelled_images"] == 20 and res["processes"] == 2
    # SimCLR's fine-tuning schedule is per step: 20 images on 2 ranks of 4 are 3 steps an
    # epoch, and the logged lr is the last step's, at (epoch + 2/3) / 2 of the cosine
    base = 0.05 * 8 / 256
    assert [r["lr"] for r in read_log(out_dir)] == pytest.approx(
        [base * 0.5 * (1 + math.cos(math.pi * (e + 2 / 3) / 2)) for e in range(2)])
    assert res["top1"] == read_log(out_dir)[-1]["top1"]
    ckpt = torch.load(os.path.join(out_dir, "checkpoint.pth"), weights_only=False)
    pre = torch.load(pretrained, weights_only=False)["model"]
    assert not torch.equal(ckpt["model"]["conv1.weight"], pre["backbone.conv1.weight"])   # fine-tuned, not frozen


@needs_fmnist
@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "0"], "--epochs 0: must be positive"),       # was: 0 read as "the default", 90 epochs
    (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
])
def test_lincls_refuses_flags_given_as_zero_or_infinite(pretrained, tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as e:
        lincls.main(["--checkpoint", str(pretrained), "--out-dir", str(tmp_path / "o")] + flags)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@needs_fmnist
def test_lincls_second_job_in_the_same_out_dir_stops_and_a_train_checkpoint_is_not_resumed(pretrained, tmp_path,
                                                                                           capsys):
    """lincls takes OUT_DIR's lock as train.py does (utils.open_run), and resumes only its own checkpoints."""
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit):
            lincls.main(["--checkpoint", str(pretrained), "--out-dir", str(out)] + FLAGS)
    assert "another job is training" in capsys.readouterr().err and not (out / "log.jsonl").exists()
    with pytest.raises(SystemExit):
        lincls.main(["--checkpoint", str(pretrained), "--out-dir", str(out), "--resume", str(pretrained)] + FLAGS)
    assert "is not a lincls.py checkpoint" in capsys.readouterr().err


@needs_fmnist
def test_lincls_keeps_each_checkpoint_s_run_apart_and_says_what_a_resume_changes(pretrained, tmp_path, capsys):
    """Each evaluated checkpoint file gets its own default OUT_DIR (checkpoint_epoch1.pth's run
    does not 'resume' checkpoint.pth's); a folder evaluating another source, or under another
    protocol, is refused in one line; a changed --lr is said, and taken (MoCo v3)."""
    import shutil
    other = pretrained.parent / "checkpoint_epoch1.pth"
    shutil.copy(pretrained, other)
    short = ["--batch-size", "40", "--workers", "0", "--epochs", "2"]
    lincls.main(["--checkpoint", str(pretrained), "--stop-after-epoch", "1"] + short)
    lincls.main(["--checkpoint", str(other), "--stop-after-epoch", "1"] + short)
    assert (pretrained.parent / "lincls" / "checkpoint.pth").exists()
    assert (pretrained.parent / "lincls_checkpoint_epoch1" / "checkpoint.pth").exists()
    out = str(pretrained.parent / "lincls")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        lincls.main(["--checkpoint", str(other), "--out-dir", out] + short)
    assert f"it evaluates {pretrained}, this command {other}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lincls.main(["--checkpoint", str(pretrained), "--encoder", "momentum"] + short)
    assert "cannot resume" in capsys.readouterr().err
    lincls.main(["--checkpoint", str(pretrained), "--lr", "0.2"] + short)
    said = capsys.readouterr().out
    assert "--lr 0.2 (was 0.1)" in said and "resumed from" in said


@needs_fmnist
def test_sigterm_mid_epoch_saves_and_the_rerun_ends_as_the_uninterrupted_run(pretrained, tmp_path, monkeypatch, capsys):
    """A preemption: SIGTERM during step 7 (epoch 2, step 2 of 5) finishes the step, saves a
    mid-epoch checkpoint and exits with 128 + 15 (run_safety.Checkpoints, as train.py); the
    same command then continues at the next batch and ends with the uninterrupted run's
    classifier and results, bit for bit."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    res = lincls.main(["--checkpoint", str(pretrained), "--out-dir", full] + FLAGS)
    ce, count = F.cross_entropy, [0]

    def signalling(*a, **kw):   # one call per training step
        count[0] += 1
        if count[0] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return ce(*a, **kw)
    monkeypatch.setattr(lincls.F, "cross_entropy", signalling)
    with pytest.raises(SystemExit) as e:
        lincls.main(["--checkpoint", str(pretrained), "--out-dir", part] + FLAGS)
    assert e.value.code == 128 + signal.SIGTERM
    assert "SIGTERM: stopped at epoch 2, step 2/5" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(part, "checkpoint.pth"), weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["within"]["step"] == 2
    monkeypatch.undo()
    again = lincls.main(["--checkpoint", str(pretrained), "--out-dir", part] + FLAGS)
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(os.path.join(full, "checkpoint.pth"), weights_only=False)["model"]
    b = torch.load(os.path.join(part, "checkpoint.pth"), weights_only=False)["model"]
    assert torch.equal(a["fc.weight"], b["fc.weight"]) and torch.equal(a["fc.bias"], b["fc.bias"])
    assert again["top1"] == res["top1"] and again["top5"] == res["top5"]
