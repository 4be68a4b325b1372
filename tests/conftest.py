"""Shared fixtures: real images written as an image folder sorted by class, the way
torchvision's ImageFolder lists ImageNet (train/<class>/..., val/<class>/...).

Fashion-MNIST's idx files come shuffled; a folder does not. Anything whose result can
depend on the order of the data (BN batches, sharding, subsets) is tested on these."""

import os
import socket
import subprocess
import sys
import textwrap

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


GLOO_HEADER = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
"""
GLOO_FOOTER = """
if __name__ == "__main__":
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=world)
    torch.save(main(rank, world), sys.argv[4] + f".rank{{rank}}")
    dist.barrier()
    dist.destroy_process_group()
"""


def gloo_ranks(tmp_path, body, world=2, timeout=120):
    """Run `body` (Python source defining main(rank, world) -> anything torch.save can write)
    on `world` gloo processes on this host; returns each rank's result, in rank order."""
    script = tmp_path / "gloo_worker.py"
    script.write_text(GLOO_HEADER.format(root=ROOT) + textwrap.dedent(body) + GLOO_FOOTER.format())
    port, out = str(free_port()), str(tmp_path / "gloo_out")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), port, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    import torch
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]
