"""Every failure a user can cause ends in one clear line (exit status 2, no traceback), and
nothing is silently wrong: bad flags, damaged checkpoints, unwritable folders, a full disk,
16-bit images, mismatched class folders, two jobs in one folder, a frozen rank."""

import fcntl
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
import train
from conftest import ROOT, TORCHRUN_ENV, needs_fmnist, torchrun_cmd
from test_train import TINY, error_line, read_log, run


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, needle", [
    (["--hflip", "1.5"], "--hflip 1.5"),
    (["--rotate", "-10"], "--rotate -10"),
    (["--num-clusters", "0"], "--num-clusters 0"),            # was: bincount RuntimeError
    (["--soft-k", "0"], "--soft-k 0"),                        # was: Faiss's bare AssertionError
    (["--merge-lambda", "nan"], "--merge-lambda nan"),        # was: never merges, silently
    (["--epochs", "0"], "--epochs 0"),                        # was: exit 0, nothing done
    (["--epochs", "-3"], "--epochs -3"),
    (["--subset", "-5"], "--subset -5"),                      # was: all images but 5
    (["--tau", "0"], "--tau 0"),                              # was: NaN loss, "lower --lr"
    (["--kappa-clip", "0"], "--kappa-clip 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "-1"], "--lr -1"),                              # was: "-0.125", the scaled lr
    (["--img-size", "0"], "--img-size 0"),                    # was: a torchvision message
    (["--feature-batch-size", "1"], "--feature-batch-size 1"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_flag_is_one_line_naming_it(flags, needle, tmp_path, capsys):
    out = tmp_path / "o"
    assert needle in error_line(capsys, TINY + flags + ["--out-dir", str(out)])
    assert not out.exists()                                   # stopped before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, capsys):
    assert "torch sees no GPU" in error_line(capsys, TINY + ["--device", "cuda", "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint", str(tmp_path / "x.pth"), "--device", "cuda"])
    assert e.value.code == 2 and "torch sees no GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------- files and folders
@needs_fmnist
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_checkpoint_on_resume(damage, tmp_path, capsys):
    out = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1", name=damage)
    path = os.path.join(out, "checkpoint.pth")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2] if damage == "truncated" else b"")
    msg = error_line(capsys, TINY + ["--out-dir", out, "--resume", "auto"])
    assert "cannot read checkpoint" in msg and "truncated" in msg


@needs_fmnist
def test_unwritable_out_dir_and_log(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")                     # an out-dir that cannot be made
    msg = error_line(capsys, TINY + ["--out-dir", str(tmp_path / "a_file" / "run")])
    assert "cannot write to --out-dir" in msg
    out = tmp_path / "run"
    (out / "log.jsonl").mkdir(parents=True)                   # the log cannot be opened
    msg = error_line(capsys, TINY + ["--out-dir", str(out)])
    assert "log.jsonl" in msg and "Is a directory" in msg


@needs_fmnist
def test_full_disk_while_writing_the_checkpoint(tmp_path, capsys):
    """The temporary checkpoint file is a link to /dev/full, a device on which every write
    fails with ENOSPC. The run says so, the last good checkpoint survives, no .tmp is left."""
    out = run(tmp_path, "--epochs", "2", "--stop-after-epoch", "1", name="full")
    tmp = os.path.join(out, "checkpoint.pth.tmp")
    os.symlink("/dev/full", tmp)
    msg = error_line(capsys, TINY + ["--out-dir", out, "--resume", "auto"])
    assert "No space left on device" in msg and "the last good checkpoint is kept" in msg
    assert not os.path.lexists(tmp)
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)["epoch"] == 1


@needs_fmnist
def test_truncated_idx_file(tmp_path, capsys):
    src = os.path.join(data.DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz")
    if not os.path.exists(src):
        pytest.skip("the Debian package ships uncompressed idx files here")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(open(src, "rb").read()[:5000])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        open(os.path.join(data.DEBIAN_FASHION_MNIST, "train-labels-idx1-ubyte.gz"), "rb").read())
    msg = error_line(capsys, TINY + ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert "train-images-idx3-ubyte.gz" in msg and "truncated" in msg


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG goes through PIL's convert('RGB') clipped at 255 (a near-binary
    image); load_image scales it to 8 bits."""
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)            # 0 .. 63,000
    Image.fromarray(ramp).save(tmp_path / "deep.png")                          # mode I;16
    img = np.asarray(data.load_image(str(tmp_path / "deep.png")))
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(img[..., 0], np.round(ramp / 257.0), atol=1)
    assert len(np.unique(img)) == 64                                         # not two values


@needs_fmnist
def test_data_dir_of_a_folder_without_data_folder(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "imgs" / split / "a").mkdir(parents=True)
    msg = error_line(capsys, TINY + ["--data-dir", str(tmp_path / "imgs"), "--out-dir", str(tmp_path / "o")])
    assert "add --data folder" in msg


def folder(root, classes_by_split, n=6):
    for split, classes in classes_by_split.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 10 * len(c), 0)).save(root / split / c / f"{i}.png")
    return str(root)


def test_evaluate_refuses_val_classes_unlike_train(tmp_path, capsys):
    """val/ holds classes a, c and train/ a, b: ImageFolder would number c as 1, train's b."""
    root = folder(tmp_path / "imgs", {"train": ["a", "b"], "val": ["a", "c"]})
    from model import build_backbone
    torch.save(build_backbone("resnet18", small_stem=True, in_chans=3, width=8)[0].state_dict(), tmp_path / "bb.pth")
    with pytest.raises(SystemExit) as e:
        ev.main(["--backbone", str(tmp_path / "bb.pth"), "--data", "folder", "--data-dir", root, "--img-size", "8",
                 "--workers", "0", "--knn-k", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "different class folders" in err, err


def test_evaluate_refuses_a_k_larger_than_the_train_split(tmp_path, capsys):
    root = folder(tmp_path / "imgs", {"train": ["a", "b"], "val": ["a", "b"]})
    from model import build_backbone
    torch.save(build_backbone("resnet18", small_stem=True, in_chans=3, width=8)[0].state_dict(), tmp_path / "bb.pth")
    with pytest.raises(SystemExit) as e:
        ev.main(["--backbone", str(tmp_path / "bb.pth"), "--data", "folder", "--data-dir", root, "--img-size", "8",
                 "--workers", "0", "--knn-k", "500"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--knn-k 500" in err and "12 train images" in err, err


def test_evaluate_refuses_a_stage_that_would_take_hours():
    """The all-pairs kNN vote over ImageNet's train split on a CPU (6.7 PFLOP) is refused
    before any image is decoded, naming the flags that avoid it."""
    args = ev.get_args(["--backbone", "x.pth", "--device", "cpu", "--no-raw", "--mislabel-votes", "knn"])
    args.device, args.data, args.img_size = torch.device("cpu"), "imagenet", 224
    with pytest.raises(ev.UserError, match="--mislabel-votes cluster"):   # asked for: costed and refused
        ev.plan(1281167, 500, 2048, 256, 1000, args)
    args.mislabel_votes = "cluster"
    ev.plan(1281167 // 100, 500, 2048, 256, 1000, args)       # a 1% subset with the cluster vote fits
    # a checkpoint of a cluster warm-up epoch has an embedding but no mixture: its report
    # clusters the train split with k-means, and that is costed too
    ev.plan(1281167, 10, 2048, 256, 1000, args)               # with a mixture the report only assigns
    with pytest.raises(ev.UserError, match="images of the report"):
        ev.plan(1281167, 10, 2048, 256, 1000, args, has_mixture=False)


# ----------------------------------------------------------------------------- runs
@needs_fmnist
def test_nan_loss_without_a_checkpoint_says_so(tmp_path, capsys):
    msg = error_line(capsys, TINY + ["--lr", "1e30", "--out-dir", str(tmp_path / "o")])
    assert "diverged" in msg and "no checkpoint was written yet" in msg


@needs_fmnist
def test_epoch_logged_but_not_saved_is_not_logged_twice(tmp_path):
    """A kill between epoch 2's log line and its checkpoint: the resumed run repeats epoch 2
    and the log holds it once."""
    out = run(tmp_path, "--epochs", "3", "--stop-after-epoch", "1", name="log")
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 0.0}) + "\n" + '{"epoch": 3, "lo')   # and a torn line
    train.main(TINY + ["--out-dir", out, "--resume", "auto", "--epochs", "3", "--stop-after-epoch", "2"])
    assert [r["epoch"] for r in read_log(out)] == [1, 2]
    assert read_log(out)[1]["loss"] != 0.0


@needs_fmnist
def test_second_job_in_the_same_out_dir_stops(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as lock:                  # the first job holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on node7")
        lock.flush()
        msg = error_line(capsys, TINY + ["--out-dir", str(out)])
    assert "another job is training" in msg and "pid 4242" in msg
    assert not (out / "log.jsonl").exists()


@needs_fmnist
def rank_pids(out):
    """{rank: pid} of the training processes whose command line names `out`."""
    ranks = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if str(out).encode() not in open(f"/proc/{pid}/cmdline", "rb").read():
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = pid
    return ranks


def test_a_killed_rank_leaves_its_survivor_one_line(tmp_path):
    """kill -9 one of two gloo ranks mid-run: the survivor's next collective fails on the lost
    connection, and it ends with one line naming that, not gloo's traceback."""
    out = tmp_path / "killed"
    cmd = torchrun_cmd("train.py", TINY + ["--epochs", "500", "--out-dir", str(out)])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):                                   # training has begun
            if (out / "log.jsonl").exists():
                break
            time.sleep(0.1)
        os.kill(rank_pids(out)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py: error:")]
    assert lines and "rank 0 lost its connection to another process" in lines[0], err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank0]: RuntimeError" not in err, err[-3000:]   # torchrun's own summary may follow


def test_a_frozen_rank_ends_the_run_after_the_timeout(tmp_path):
    """SIGSTOP one of two gloo ranks mid-run: the other waits --dist-timeout (6 s here), then
    stops with one line, instead of hanging for ever."""
    out = tmp_path / "frozen"
    cmd = torchrun_cmd("train.py", TINY + ["--epochs", "500", "--dist-timeout", "0.1", "--out-dir", str(out)])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):                                   # training has begun
            if (out / "log.jsonl").exists():
                break
            time.sleep(0.1)
        ranks = rank_pids(out)
        os.kill(ranks[1], signal.SIGSTOP)
        for _ in range(600):                                   # rank 0 gives up after the timeout
            try:
                os.kill(ranks[0], 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        os.kill(ranks[1], signal.SIGKILL)                      # what torchrun would do, 30 s later
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "train.py: error: rank 0 waited 0.1 min for another process, which stopped" in err, err[-3000:]


# ----------------------------------------------------------------------------- data.py SRC DST (a resized copy)
def _image_folder(root, n=2):
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, "a"), exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(os.path.join(root, split, "a", f"{i}.png"))
    return str(root)


def data_py(capsys, *argv):
    """python data.py argv, in this process: (exit code, what it printed on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("dst, needle", [
    ("{src}", "is SRC"), ("{src}/", "is SRC"), ("{src}/../src", "is SRC"),   # was: the originals overwritten, rc 0
    ("{src}/train/x", "is inside SRC"),                                       # was: copies in SRC's training split
    ("{tmp}", "contains SRC"),
])
def test_data_py_refuses_a_copy_over_or_inside_its_source(dst, needle, tmp_path, capsys):
    src = _image_folder(tmp_path / "src")
    before = {f: open(os.path.join(src, "train", "a", f), "rb").read() for f in os.listdir(os.path.join(src, "train", "a"))}
    code, err = data_py(capsys, src, dst.format(src=src, tmp=tmp_path))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert {f: open(os.path.join(src, "train", "a", f), "rb").read() for f in before} == before
    assert sorted(os.listdir(os.path.join(src, "train"))) == ["a"]


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"), ("file", "is a file"), ("no splits", "has no train/"),
    ("side 0", "--side 0"), ("corrupt", "cannot read image"), ("text as png", "cannot read image"),
    ("empty", "holds no images"),
])
def test_data_py_bad_source_is_one_line_naming_it(case, needle, tmp_path, capsys):
    src = tmp_path / "src"
    extra = []
    if case == "file":
        src.write_text("x")
    elif case == "no splits":
        src.mkdir()
    elif case == "side 0":
        _image_folder(src)
        extra = ["--side", "0"]
    elif case in ("corrupt", "text as png"):
        _image_folder(src)
        bad = src / "train" / "a" / ("bad.jpg" if case == "corrupt" else "bad.png")
        bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20 if case == "corrupt" else b"not an image")
        needle = f"{needle} {bad}"
    elif case == "empty":
        os.makedirs(src / "train" / "a"), os.makedirs(src / "val" / "a")
    code, err = data_py(capsys, src, tmp_path / "copy", "--workers", "1", *extra)
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("data.py: error:")
