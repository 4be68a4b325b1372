"""bench/bench_step.py runs and measures the model its flags describe (no timing asserted:
speed is for the bench, not for tests)."""

import json
import os
import subprocess
import sys

from conftest import ROOT, needs_fmnist



def test_bench_step_measures_the_preset_model():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_step.py"), "--batch-size", "8", "--feature-batch-size", "8",
           "--proj-hidden", "32", "--pred-hidden", "32", "--dim", "16", "--num-clusters", "24"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "resnet18 width 16 16px" in lines[0]          # the CPU preset's narrow ResNet, not torchvision's 64
    assert "training step, batch 8" in lines[1] and "images/s" in lines[1]
    assert "feature pass, batch 8" in lines[2] and "of a training epoch" in lines[2]


def test_check_faiss_gpu_compares_the_searches_it_can_run():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "check_faiss_gpu.py"), "--n", "2000", "--k", "300", "--dim", "32",
           "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert "CUDA libraries loaded:" in out.stdout
    assert "torch search on cpu: same nearest centroid as CPU Faiss for 100.0000% of queries" in out.stdout


def test_check_gpu_data_runs_its_measurements_on_the_cpu():
    """The GPU data check's code path (decode_jpeg, the batched crops, the ResNet-50 step, the
    feature pass in two precisions) on a CPU, small: it must run as prepared on the first GPU."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "check_gpu_data.py"), "--device", "cpu", "--n", "4",
           "--batch", "4", "--size", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    for row in ("decode_jpeg on the CPU", "two random-resized crops", "train step, ResNet-50", "feature pass, fp32"):
        assert row in out.stdout
    assert "embedding cosine mean 1.00000" in out.stdout   # autocast is off on a CPU: bf16 = fp32 there


# ---- every bench script's smallest case, so that a renamed field cannot break one silently
def bench(script, *argv, timeout=300):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *argv], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


TINY_TRAIN = ("--subset 128 --batch-size 32 --proj-hidden 32 --pred-hidden 32 --dim 16 --pca-dim 8 --num-clusters 20 "
              "--workers 0")
TINY_EVAL = "--train-subset 300 --test-subset 100 --probe-epochs 2 --grid-clusters 2 --kmeans-redo 1 --workers 0"


def test_bench_step_instance_only_json_and_profile(tmp_path):
    """--cluster-weight 0 drops the cluster term as train.py does; --json and --profile write
    what bench/device_check.sh reads."""
    common = ["--batch-size", "4", "--feature-batch-size", "4", "--proj-hidden", "16", "--pred-hidden", "16", "--dim", "8",
              "--num-clusters", "12", "--steps", "1"]
    out = bench("bench_step.py", *common, "--cluster-weight", "0", "--json", str(tmp_path / "s.json"),
                "--profile", str(tmp_path / "p.txt"))
    assert "(instance-only)" in out and "FLOP per image" in out
    fig = json.load(open(tmp_path / "s.json"))
    assert fig["kind"] == "instance-only" and fig["flop_per_image"] > 0 and fig["step_images_per_s"] > 0
    assert "Self CPU" in open(tmp_path / "p.txt").read()


def test_bench_cluster_search_merge_and_fit(tmp_path):
    out = bench("bench_cluster.py", "--search-n", "3000", "--k", "200", "--merge-k", "1500", "--dim", "32",
                "--repeats", "1", "--n", "3000", "--nredo", "2", "--init-iters", "2", "--threads", "1",
                "--json", str(tmp_path / "c.json"))
    assert "0. E-step search" in out and "1. Merging" in out and "ratio PCL re-init / warm start" in out
    fig = json.load(open(tmp_path / "c.json"))
    assert fig["search"]["agree_with_cpu"] == 1.0
    assert all(c["merged"] > 0 for c in fig["merge"]["cases"])      # merge() ran (it crashed on a missing rbar)
    assert fig["em"]["warm_esteps"] < fig["em"]["reinit_esteps"]


def test_bench_kstop_smallest_grid():
    out = bench("bench_kstop.py", "--rules", "eq11,bic", "--k", "5", "--dims", "32", "--rbar", "0.8", "--k0", "2",
                "--rounds", "5")
    assert "| vMF D=32 rbar=0.8 N=1000 | 5 | 10 |" in out


def test_bench_loader_smallest(tmp_path):
    out = bench("bench_loader.py", "--n", "4", "--out", str(tmp_path / "bl"), "--size", "32")
    assert "feature pass from the resized copy" in out and "cosine mean" in out


@needs_fmnist
def test_bench_quality_mislabels_and_recipe_smallest(tmp_path):
    """bench_quality (train + evaluate per variant), bench_mislabels on its checkpoint, and
    bench_recipe's grid: a finished cell is skipped on the rerun, and the table has it."""
    q = str(tmp_path / "q")
    out = bench("bench_quality.py", "--out-dir", q, "--eval-args", TINY_EVAL, "--", *TINY_TRAIN.split(), "--epochs", "1")
    assert "| SiamMM (default) |" in out and "| instance-only (--cluster-weight 0) |" in out
    out = bench("bench_mislabels.py", "--checkpoint", os.path.join(q, "default", "checkpoint.pth"), "--train-subset", "300",
                "--workers", "0")
    assert "flipped" in out
    r = str(tmp_path / "r")
    argv = ["--sets", "digits", "--settings", "default,shapes", "--budget", "0.03", "--out-dir", r,
            "--train-args", TINY_TRAIN, "--eval-args", TINY_EVAL.replace("--train-subset 300 --test-subset 100 ", "")]
    bench("bench_recipe.py", *argv)
    table = open(os.path.join(r, "grid.md")).read()
    assert "| digits (10) | screen-x0.03 | default | 1 | 1 |" in table
    assert "| digits (10) | screen-x0.03 | shapes | 1 | 1 |" in table
    assert len(open(os.path.join(r, "grid.csv")).read().splitlines()) == 3
    stamp = os.path.getmtime(os.path.join(r, "digits", "shapes", "screen-x0.03-seed0", "cell.json"))
    out = bench("bench_recipe.py", *argv)                                  # resumable: nothing runs again
    assert os.path.getmtime(os.path.join(r, "digits", "shapes", "screen-x0.03-seed0", "cell.json")) == stamp
    assert "digits  shapes" in out
