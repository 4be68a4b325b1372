"""train.py that sends a signal to itself during a chosen training step, on one chosen rank:
the signal then arrives at a known point, on one rank only, as a preemption's may.

    python tests/signal_at.py STEP RANK SIGNAL train-flags...
    python -m torch.distributed.run --nproc_per_node=2 tests/signal_at.py STEP RANK SIGNAL train-flags...

STEP counts the training steps this process has run (1 = its first); SIGNAL is a name
(SIGTERM, SIGUSR1)."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def install(step, rank, signum, patch=setattr):
    """Wrap train.siammm_loss (called once per step) to send `signum` during step `step`."""
    loss, count = train.siammm_loss, [0]

    def signalling_loss(*a, **kw):
        count[0] += 1
        if count[0] == step and int(os.environ.get("RANK", 0)) == rank:
            os.kill(os.getpid(), signum)
        return loss(*a, **kw)
    patch(train, "siammm_loss", signalling_loss)


if __name__ == "__main__":
    install(int(sys.argv[1]), int(sys.argv[2]), getattr(signal, sys.argv[3]))
    train.main(sys.argv[4:])
