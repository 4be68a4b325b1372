"""bench/bench_step.py runs and measures the model its flags describe (no timing asserted:
speed is for the bench, not for tests)."""

import os
import subprocess
import sys

from conftest import ROOT



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
