"""Faiss is optional (search.faiss_module): a node with torch and no Faiss (a GPU node where
faiss-gpu would not install) trains, merges and evaluates with torch's exact search, and
says so. Faiss is made unimportable by sys.modules["faiss"] = None, which makes `import
faiss` raise ImportError as on a machine without it."""

import os
import subprocess
import sys

import numpy as np
import torch

import search
from conftest import ROOT, needs_fmnist

# train.py or evaluate.py as __main__, with Faiss unimportable
NO_FAISS = ("import runpy, sys; sys.modules['faiss'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, {root!r}); runpy.run_path(sys.argv[0], run_name='__main__')")


def run_without_faiss(script, *argv):
    cmd = [sys.executable, "-c", NO_FAISS.format(root=ROOT), os.path.join(ROOT, script), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@needs_fmnist
def test_train_and_evaluate_run_without_faiss(tmp_path):
    out = str(tmp_path / "run")
    r = run_without_faiss("train.py", "--subset", "128", "--batch-size", "32", "--epochs", "2", "--workers", "0",
                          "--proj-hidden", "32", "--pred-hidden", "32", "--dim", "16", "--pca-dim", "8",
                          "--num-clusters", "24", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "E-step search: torch on cpu (Faiss is not installed)" in r.stdout
    assert r.stderr.count("note: Faiss is not installed") == 1      # one line, once
    assert "epoch 2/2" in r.stdout and "| K " in r.stdout           # clustered and merged
    r = run_without_faiss("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pth"), "--train-subset", "300",
                          "--test-subset", "100", "--probe-epochs", "2", "--grid-clusters", "2", "--kmeans-redo", "1")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(out, "eval", "results.json"))


def test_searches_without_faiss_equal_faiss(monkeypatch):
    """knn_search and close_pairs give Faiss's answers when Faiss is missing; close_pairs above
    EXACT_MAX (where Faiss cuts the sphere into cells) stays exact, so it finds every pair."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1).numpy()
    db = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1).numpy()
    with_faiss = search.knn_search(q, db, 4)
    pairs_faiss = search.close_pairs(db, 0.5, exact_max=10)          # Faiss's coarse cells
    monkeypatch.setattr(search, "_FAISS", [None])
    assert search.faiss_module() is None and not search.faiss_has_gpu()
    without = search.knn_search(q, db, 4)
    assert (without[1] == with_faiss[1]).all()
    np.testing.assert_allclose(without[0], with_faiss[0], atol=1e-5)
    rows, cols, d = search.close_pairs(db, 0.5, exact_max=10)        # exact at every K without Faiss
    sims = db @ db.T
    i, j = np.nonzero(np.triu(1 - sims < 0.5, k=1))
    nearest = {(a, b) for a, b in zip(i, j) if b in np.argsort(-sims[a])[1:6] or a in np.argsort(-sims[b])[1:6]}
    assert nearest == set(zip(rows.tolist(), cols.tolist()))
    assert len(rows) >= len(pairs_faiss[0])
