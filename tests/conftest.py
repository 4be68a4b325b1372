"""Shared fixtures: real images written as an image folder sorted by class, the way
torchvision's ImageFolder lists ImageNet (train/<class>/..., val/<class>/...).

Fashion-MNIST's idx files come shuffled; a folder does not. Anything whose result can
depend on the order of the data (BN batches, sharding, subsets) is tested on these."""

import os
import socket
import subprocess
import sys

import pytest

import data
from bench.fmnist_folder import write_class_folder  # noqa: F401 (the tests' class-sorted folders)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_FMNIST = any(os.path.exists(os.path.join(data.DEBIAN_FASHION_MNIST, f))
                  for f in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="session")
def sorted_folder(tmp_path_factory):
    """4 classes x 50 train (and 10 val) real images, PNG, listed class by class."""
    if not HAVE_FMNIST:
        pytest.skip("apt-get install dataset-fashion-mnist")
    return write_class_folder(tmp_path_factory.mktemp("sorted"), 50, 10, classes=4)


def free_port():
    """A free TCP port on this host, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(script, argv, nproc=2, launcher=()):
    """The command line of `torchrun --nproc_per_node=nproc script argv` on this host (gloo
    on the CPU); launcher: torchrun's own flags (default: a free port on 127.0.0.1)."""
    launcher = list(launcher) or ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher,
            os.path.join(ROOT, script)] + list(argv)


TORCHRUN_ENV = dict(os.environ, OMP_NUM_THREADS="1")   # torchrun's own default: one thread per process


def torchrun(script, argv, nproc=2, cwd=ROOT, timeout=900):
    """Run torchrun_cmd to the end; returns the CompletedProcess (stdout, stderr as text)."""
    return subprocess.run(torchrun_cmd(script, argv, nproc), cwd=cwd, env=TORCHRUN_ENV, capture_output=True,
                          text=True, timeout=timeout)
