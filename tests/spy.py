"""train.py with recorders on its seams, so that a test can check what reached the loss
against what it should have been, by a route independent of train.py's index plumbing.

What is recorded, per process, in the order it happened (run with --workers 0, so that
every image is read in this process, in batch order):
  fetch     every image an ImageFolder hands out: ("features" or "train", epoch, file path)
  feats     each epoch's feature pass output (rows in the order of its fetches)
  mixture   each epoch's E-step result as the training step gets it: centroids, kappa
            (normalised for the loss), and the cluster sizes
  steps     each training step: the nbr and w rows that reached the loss, and the loss
  epochs    after each epoch: a digest of the parameters and this rank's mixture state

In a test:   records = spy.run(train_flags, monkeypatch.setattr)
Under torchrun (one file of records per rank):
    python -m torch.distributed.run --nproc_per_node=2 tests/spy.py PREFIX train-flags...
"""

import hashlib
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402


def digest(tensors):
    """SHA-256 over the bytes of a sequence of tensors (bit-identical or not)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def install(patch):
    """Wrap train.py's seams with recorders; `patch(obj, name, value)` sets an attribute
    (pytest's monkeypatch.setattr in a test, setattr in a script). Returns the records."""
    rec = {"fetch": [], "feats": [], "mixture": [], "steps": [], "epochs": [], "epoch": -1}

    get_item = data.ImageFolder.__getitem__

    def getitem(self, i):
        kind = "train" if isinstance(self.transform, data.TwoViews) else "features"
        rec["fetch"].append((kind, rec["epoch"], self.samples[i][0]))
        return get_item(self, i)
    patch(data.ImageFolder, "__getitem__", getitem)

    feature_pass = train.feature_pass

    def spy_feature_pass(*a, **kw):
        rec["epoch"] += 1
        feats, index = feature_pass(*a, **kw)
        rec["feats"].append(feats.clone())
        return feats, index
    patch(train, "feature_pass", spy_feature_pass)

    cluster_step = train.cluster_step

    def spy_cluster_step(model, mixture, *a, **kw):
        out = cluster_step(model, mixture, *a, **kw)
        rec["mixture"].append({"centroids": out.centroids.cpu().clone(), "kappa": out.kappa.cpu().clone(),
                               "counts": mixture.counts.clone()})
        return out
    patch(train, "cluster_step", spy_cluster_step)

    loss_fn = train.siammm_loss
    names = inspect.signature(loss_fn)

    def spy_loss(*a, **kw):
        bound = names.bind(*a, **kw).arguments
        out = loss_fn(*a, **kw)
        rows = bound.get("a")                  # the batch's cluster.Assignment (None: no cluster term)
        nbr, w = (None, None) if rows is None else (rows.nbr, rows.w)
        rec["steps"].append({"epoch": rec["epoch"], "loss": float(out[0].detach()), "inst": float(out[1]),
                             "clus": float(out[2]),
                             "nbr": None if nbr is None else nbr.cpu().clone(),
                             "w": None if w is None else w.cpu().clone()})
        return out
    patch(train, "siammm_loss", spy_loss)

    save = train.save_checkpoint

    def spy_save(model, optimizer, scaler, mixture, epoch, steps, args, within=None):
        if within is None:   # an epoch's end (a mid-epoch checkpoint is not an epoch)
            rec["epochs"].append({"params": digest(p for _, p in sorted(model.named_parameters())),
                                  "mixture": {k: v.clone() for k, v in mixture.state_dict().items()
                                              if isinstance(v, torch.Tensor)} if mixture.centroids is not None else None})
        return save(model, optimizer, scaler, mixture, epoch, steps, args, within)
    patch(train, "save_checkpoint", spy_save)
    return rec


def run(argv, patch):
    """train.main(argv) with the recorders; returns the records of this process."""
    rec = install(patch)
    train.main(argv)
    return rec


def by_rank(prefix, world):
    return [torch.load(f"{prefix}.rank{r}", weights_only=False) for r in range(world)]


if __name__ == "__main__":
    prefix, argv = sys.argv[1], sys.argv[2:]
    records = run(argv, setattr)
    torch.save(records, f"{prefix}.rank{os.environ.get('RANK', '0')}")
