"""A run is never lost: rerunning a command continues it, SIGTERM / SIGUSR1 stop it mid-epoch
with a checkpoint from which it continues bit-identically (one process, and two torchrun
ranks of which only one got the signal), a timed checkpoint survives a hard kill, and the
Slurm recipe (slurm.sbatch) requeues and continues, run here with stand-ins for srun and
scontrol."""

import argparse
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import signal_at
import train
from conftest import ROOT, TORCHRUN_ENV, free_port, torchrun
from test_train import TINY, read_log


def run(out, *extra):
    train.main(TINY + ["--out-dir", str(out)] + list(extra))


def assert_same_run(a_dir, b_dir):
    """Weights, optimiser momentum, mixture and logged losses bit-identical."""
    a = torch.load(os.path.join(a_dir, "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(b_dir, "checkpoint.pth"), weights_only=False)
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"] and b["within"] is None
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k
    for k in ("centroids", "counts", "kappa", "rbar"):
        assert torch.equal(a["mixture"][k], b["mixture"][k]), k
    la, lb = read_log(a_dir), read_log(b_dir)
    assert [r["epoch"] for r in lb] == [r["epoch"] for r in la]
    for k in ("loss", "loss_inst", "loss_clus", "view_distance", "K", "merged"):
        assert [r[k] for r in la] == [r[k] for r in lb], k


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run(out)
    return str(out)


def test_rerunning_the_command_continues_and_resume_none_starts_afresh(full, tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--stop-after-epoch", "1")
    capsys.readouterr()
    run(out)                                          # the same command again: no --resume needed
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(full, out)
    run(out, "--resume", "none", "--epochs", "1")     # afresh, on purpose: the old log goes too
    assert [r["epoch"] for r in read_log(out)] == [1]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1


def test_resume_none_moves_the_old_run_aside_and_a_killed_fresh_run_never_resumes_it(tmp_path, monkeypatch, capsys):
    """--resume none over a finished run: its checkpoints and log move to OUT_DIR/replaced/
    (said in one line); a fresh run stopped in its first epoch then leaves no old checkpoint
    for the plain rerun to 'resume': that rerun trains the new run, and the stop line says
    how to continue (the same command with --resume none would start afresh again)."""
    out = tmp_path / "run"
    run(out, "--save-every", "1")
    capsys.readouterr()
    signal_at.install(2, 0, signal.SIGTERM, monkeypatch.setattr)
    with pytest.raises(SystemExit):
        run(out, "--resume", "none")
    said = capsys.readouterr().out
    assert "the earlier run's checkpoint.pth, checkpoint_epoch1.pth, checkpoint_epoch2.pth, log.jsonl moved to" in said
    assert "rerun it without --resume none to continue" in said
    assert sorted(os.listdir(out / "replaced")) == ["checkpoint.pth", "checkpoint_epoch1.pth", "checkpoint_epoch2.pth",
                                                    "log.jsonl"]
    assert not any(n.startswith("checkpoint_epoch") for n in os.listdir(out))
    assert torch.load(out / "checkpoint.pth", weights_only=False)["within"]["step"] == 2   # the new run's
    monkeypatch.undo()
    run(out)
    assert "resumed from" in capsys.readouterr().out and [r["epoch"] for r in read_log(out)] == [1, 2]


def test_resume_path_seeds_a_run_once_and_an_empty_resume_is_refused(tmp_path, capsys):
    """--resume PATH starts this folder's run from PATH; once the folder has its own
    checkpoint, the same command (a requeued job) continues that instead of PATH again."""
    seed, out = tmp_path / "seed", tmp_path / "run"
    run(seed, "--epochs", "1")
    run(out, "--resume", str(seed / "checkpoint.pth"), "--stop-after-epoch", "2", "--epochs", "3")
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 2
    capsys.readouterr()
    run(out, "--resume", str(seed / "checkpoint.pth"), "--epochs", "3")
    said = capsys.readouterr().out
    assert "holds this run's own progress: continuing it" in said and "resumed from" in said and "at epoch 2" in said
    assert [r["epoch"] for r in read_log(out)] == [2, 3]      # epoch 1 is the seed's
    with pytest.raises(SystemExit):
        run(tmp_path / "empty", "--resume", "")
    assert "--resume is empty (an unset variable?)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run(out, "--stop-after-epoch", "1")
    return out


@pytest.mark.parametrize("flag, value", [("--subset", "100"), ("--seed", "3"), ("--num-clusters", "30")])
def test_a_resume_refuses_flags_it_cannot_honour(flag, value, one_epoch, capsys):
    """--subset and --seed choose the images (and their views), --num-clusters is K0, used by
    the first clustering: changed on a resume they would train other data or do nothing."""
    before = os.path.getmtime(one_epoch / "checkpoint.pth")
    with pytest.raises(SystemExit):
        run(one_epoch, flag, value)
    assert os.path.getmtime(one_epoch / "checkpoint.pth") == before       # refused before anything was written
    err = capsys.readouterr().err
    assert f"with {flag} {value}: the run has {flag}" in err and "use the same value or another --out-dir" in err


def test_a_resume_reads_moved_data_but_refuses_other_data(sorted_folder, tmp_path, capsys):
    """--data-dir may move (a copy on a node's local disk after a requeue): the same images
    are accepted and said; a folder of other images is refused in one line."""
    import shutil
    flags = ["--data", "folder", "--batch-size", "32", "--subset", "0", "--num-clusters", "12"]
    out, moved, other = tmp_path / "run", tmp_path / "moved", tmp_path / "other"
    shutil.copytree(sorted_folder, moved)
    shutil.copytree(sorted_folder, other)
    os.remove(next(os.path.join(r, f) for r, _, fs in os.walk(other / "train") for f in sorted(fs)))
    run(out, *flags, "--data-dir", sorted_folder, "--stop-after-epoch", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(out, *flags, "--data-dir", str(other))
    assert "holds 199 images of 4 classes" in capsys.readouterr().err
    run(out, *flags, "--data-dir", str(moved))
    said = capsys.readouterr().out
    assert f"reading the run's data from {moved}" in said and "resumed from" in said


@pytest.mark.parametrize("sig,step", [("SIGTERM", 3), ("SIGUSR1", 6)])   # mid epoch 1 / mid epoch 2
def test_a_signal_saves_mid_epoch_and_the_rerun_is_bit_identical(full, tmp_path, monkeypatch, capsys, sig, step):
    out = tmp_path / "run"
    signal_at.install(step, 0, getattr(signal, sig), monkeypatch.setattr)
    with pytest.raises(SystemExit) as stopped:
        run(out)
    assert stopped.value.code == 128 + getattr(signal, sig)
    assert f"{sig}: stopped at epoch {(step - 1) // 4 + 1}, step {(step - 1) % 4 + 1}/4" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handlers train.py found are back
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == (step - 1) // 4 and ckpt["within"]["step"] == (step - 1) % 4 + 1
    assert ckpt["step"] == step and ckpt["within"]["assignment"]["nbr"].shape[0] == 128
    monkeypatch.undo()
    run(out)
    assert_same_run(full, out)


def test_a_signal_in_an_epoch_s_last_step_ends_that_epoch_first(full, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_at.install(4, 0, signal.SIGTERM, monkeypatch.setattr)   # step 4 of 4
    with pytest.raises(SystemExit):
        run(out)
    assert "SIGTERM: stopped at the end of epoch 1" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["within"] is None and [r["epoch"] for r in read_log(out)] == [1]
    monkeypatch.undo()
    run(out)
    assert_same_run(full, out)


def test_a_timed_checkpoint_survives_a_hard_kill(full, tmp_path, monkeypatch):
    """--checkpoint-minutes ~0: a mid-epoch checkpoint after every step. A crash in step 7
    (standing in for kill -9) loses only that step."""
    out = tmp_path / "run"
    loss, count = train.siammm_loss, [0]

    def crash(*a, **kw):
        count[0] += 1
        if count[0] == 7:
            raise KeyboardInterrupt   # no handler of train.py's runs: as abrupt as it gets in-process
        return loss(*a, **kw)
    monkeypatch.setattr(train, "siammm_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--checkpoint-minutes", "1e-9")
    assert torch.load(out / "checkpoint.pth", weights_only=False)["within"]["step"] == 2   # step 6 = epoch 2, step 2
    monkeypatch.undo()
    run(out, "--checkpoint-minutes", "1e-9")
    assert_same_run(full, out)


TWO = TINY + ["--workers", "1", "--num-clusters", "16"]


def test_a_signal_to_one_torchrun_rank_stops_both_and_the_rerun_is_bit_identical(tmp_path):
    """SIGUSR1 reaches rank 1 alone, in epoch 2's second step (with a loader worker each, which
    ignores it): both ranks stop after that step, rank 0 writes the checkpoint, and the
    resumed 2-process run ends bit-identical to an uninterrupted one."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    res = torchrun("train.py", TWO + ["--out-dir", full])
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun("tests/signal_at.py", ["6", "1", "SIGUSR1"] + TWO + ["--out-dir", part])
    assert res.returncode != 0 and "SIGUSR1: stopped at epoch 2, step 2/4" in res.stdout, res.stderr[-3000:]
    assert torch.load(os.path.join(part, "checkpoint.pth"), weights_only=False)["within"]["step"] == 2
    res = torchrun("train.py", TWO + ["--out-dir", part])
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    assert_same_run(full, part)


STAND_INS = {
    # srun: drop its own options, run the command here (one node)
    "srun": '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    # scontrol: this host as the node list; a requeue is recorded
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> "$SCONTROL_LOG"; fi\n',
}


def test_slurm_recipe_requeues_before_the_time_limit_and_the_requeued_job_continues(tmp_path):
    """slurm.sbatch run by bash with srun and scontrol stand-ins, one node of two CPU ranks:
    USR1 to the script (Slurm's --signal=B:USR1 before the time limit) reaches the training
    ranks through its trap, they checkpoint and exit, the script requeues the job
    (scontrol requeue JOBID); the job run again continues and completes every epoch once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out, log = tmp_path / "run", tmp_path / "scontrol.log"
    env = dict(TORCHRUN_ENV, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242", GPUS_PER_NODE="2",
               MASTER_PORT=str(free_port()), SCONTROL_LOG=str(log))
    cmd = ["bash", os.path.join(ROOT, "slurm.sbatch"), "train.py"] + TINY + ["--epochs", "3", "--out-dir", str(out)]
    # another job of the same user on the node, whose command line matches: it must not get the signal
    decoy_log = tmp_path / "decoy.log"
    decoy = subprocess.Popen([sys.executable, "-u", "-c", "import signal, sys, time; signal.signal(signal.SIGUSR1, "
                              "lambda *a: open(sys.argv[1], 'w').write('USR1')); time.sleep(600)", str(decoy_log),
                              "train.py"], env=dict(env, SLURM_JOB_ID="999"))
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):                        # wait for epoch 1 to be logged
            if (out / "log.jsonl").exists() and (out / "log.jsonl").read_text().strip():
                break
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)
        text, _ = job.communicate(timeout=300)
    finally:
        job.kill()
        decoy.kill()
    assert not decoy_log.exists()                    # job 999's process was left alone
    assert "time limit near" in text and "SIGUSR1: stopped at" in text, text[-3000:]
    assert "outlasted the warning" not in text
    assert log.read_text().split() == ["requeue", "4242"]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] < 3
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)   # the requeued job
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["epoch"] for r in read_log(out)] == [1, 2, 3]
    assert log.read_text().split() == ["requeue", "4242"]   # finished: not requeued again


SIGTERM_IN_FEATURE_PASS = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import data, train
to_input, sent = data.to_input, []
def signalling_to_input(*a, **kw):   # its first call is the first feature-pass batch
    if not sent:
        sent.append(1)
        os.killpg(0, signal.SIGTERM)   # every process of the job, loader workers too (Slurm, torchrun)
        time.sleep(1)
    return to_input(*a, **kw)
data.to_input = signalling_to_input
train.main(sys.argv[1:])
"""


def test_sigterm_to_every_process_during_the_feature_pass_stops_with_a_checkpoint(tmp_path):
    """SIGTERM to the whole process group while the feature pass's workers are loading: they
    ignore it, the pass ends, the first step is taken, the run saves and says so, and the
    rerun finishes the run (no 'DataLoader worker killed by signal')."""
    script = tmp_path / "term_in_pass.py"
    script.write_text(SIGTERM_IN_FEATURE_PASS.format(root=ROOT))
    out = tmp_path / "run"
    argv = TINY + ["--workers", "2", "--feature-batch-size", "16", "--out-dir", str(out)]
    r = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 128 + signal.SIGTERM, r.stdout[-2000:] + r.stderr[-2000:]
    assert "SIGTERM: stopped at epoch 1, step 1/4" in r.stdout and "killed by signal" not in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert [e["epoch"] for e in read_log(out)] == [1, 2]


def test_slurm_recipe_requeues_when_the_stop_outlasts_the_warning(tmp_path):
    """A stop slower than the warning (here STOP_GRACE 1 s against a program that ignores
    USR1) is cut short by the requeue itself: the job comes back instead of ending as
    TIMEOUT, and it is requeued once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    slow = tmp_path / "slow.py"
    slow.write_text("import signal, time\nsignal.signal(signal.SIGUSR1, signal.SIG_IGN)\ntime.sleep(8)\n")
    log = tmp_path / "scontrol.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4243", GPUS_PER_NODE="1",
               MASTER_PORT=str(free_port()), SCONTROL_LOG=str(log), STOP_GRACE="1")
    job = subprocess.Popen(["bash", os.path.join(ROOT, "slurm.sbatch"), str(slow)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    job.send_signal(signal.SIGUSR1)
    text, _ = job.communicate(timeout=60)
    assert "outlasted the warning, requeueing now" in text, text
    assert log.read_text().split() == ["requeue", "4243"]


def test_the_card_command_on_a_gpu_says_it_runs_the_cpu_demo():
    args = train.get_args([])
    assert args.out_dir == os.path.join("runs", "cpu") and args.resume == "auto"
    assert train.preset_note(argparse.Namespace(**vars(args) | {"device": torch.device("cuda")})).startswith(
        "no --preset: this runs the CPU demo")
    cpu = argparse.Namespace(**vars(args) | {"device": torch.device("cpu")})
    assert train.preset_note(cpu) is None                        # on a CPU the demo is what a user asked for
    gpu = train.get_args(["--preset", "imagenet-100ep", "--data-dir", "x"])
    assert gpu.out_dir == os.path.join("runs", "imagenet-100ep")
    assert train.preset_note(argparse.Namespace(**vars(gpu) | {"device": torch.device("cuda")})) is None


def test_a_sample_s_views_depend_on_the_seed_epoch_and_image_alone():
    """SeededSamples: the same (seed, epoch, index) gives the same two views whatever was drawn
    before (a worker's history, a resume), another epoch or seed other views, and the
    caller's RNG is left as it was."""
    import data
    ds = data.SeededSamples(data.subset(data.load_dataset("fashion-mnist", "", "train", data.train_transform(16, 0.2)),
                                        64, 0))
    (a1, a2), _, i = ds[(0, 1, 5)]
    state = torch.get_rng_state()
    torch.rand(7)
    (b1, b2), _, _ = ds[(0, 1, 5)]
    assert i == 5 and torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert not torch.equal(ds[(0, 2, 5)][0][0], a1) and not torch.equal(ds[(1, 1, 5)][0][0], a1)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.rand(7)
    assert torch.equal(after, torch.get_rng_state())
