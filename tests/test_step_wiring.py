"""The training step is wired as the paper says (sec. 3.1, 5.1; MoCo v3), checked on a real
run of train.py through recorders on its seams:
  - the momentum encoder is updated once per step, theta_m <- m theta_m + (1 - m) theta, with
    m from the cosine schedule m0 -> 1 at that step's fractional epoch;
  - each prediction is paired with the OTHER view's key (eq. 12: q1 with k2, q2 with k1): the
    network returns the keys of the views it was given, in order, train.py passes them in
    that order, and the loss pairs them across views;
  - every module is in training mode during the step (BN on batch statistics in both branches);
  - the sampler's epoch reaches the augmentations: each image's views are drawn for the epoch
    being trained, not for epoch 0 over and over.
Each breaks a test here when broken on purpose (and none of them broke any other test)."""

import pytest
import torch
import torch.nn.functional as F

import data
import model as model_mod
import train
import utils
from conftest import needs_fmnist
from test_train import TINY

pytestmark = needs_fmnist


def run_with_recorders(tmp_path, monkeypatch, *extra):
    rec = {"momentum": [], "forward": [], "loss": [], "views": [], "mode_ok": []}

    update = model_mod.SiamMM.update_momentum

    def spy_update(self, m):
        online = [p.detach().clone() for p in list(self.backbone.parameters()) + list(self.projector.parameters())]
        before = [p.detach().clone() for p in self.momentum_parameters()]
        update(self, m)
        after = self.momentum_parameters()
        err = max(float((a - (m * b + (1 - m) * o)).abs().max()) for a, b, o in zip(after, before, online))
        rec["momentum"].append((m, err))
    monkeypatch.setattr(model_mod.SiamMM, "update_momentum", spy_update)

    forward = model_mod.SiamMM.forward

    def spy_forward(self, x1, x2):
        rec["mode_ok"].append(all(m.training for m in self.modules()))
        out = forward(self, x1, x2)
        with torch.no_grad():   # the keys of each view, computed here from that view alone
            keys = [F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=1) for x in (x1, x2)]
        rec["forward"].append((out, keys))
        return out
    monkeypatch.setattr(model_mod.SiamMM, "forward", spy_forward)

    loss_fn = train.siammm_loss

    def spy_loss(q1, q2, k1, k2, a=None, **kw):
        out = loss_fn(q1, q2, k1, k2, a, **kw)
        rec["loss"].append(((q1.detach(), q2.detach(), k1, k2), float(out[1])))
        return out
    monkeypatch.setattr(train, "siammm_loss", spy_loss)

    get_item = data.SeededSamples.__getitem__

    def spy_item(self, key):
        rec["views"].append(key)
        return get_item(self, key)
    monkeypatch.setattr(data.SeededSamples, "__getitem__", spy_item)

    train.main(TINY + ["--out-dir", str(tmp_path / "run")] + list(extra))
    return rec


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """One recorded run (TINY, m0 = 0.9) for the tests below."""
    with pytest.MonkeyPatch.context() as mp:
        return run_with_recorders(tmp_path_factory.mktemp("wiring"), mp, "--ema-momentum", "0.9")


def test_momentum_encoder_follows_the_cosine_schedule_once_per_step(rec):
    steps, epochs = 4, 2                                    # TINY: 128 images, batch 32, 2 epochs
    assert len(rec["momentum"]) == steps * epochs           # once per step, never skipped or doubled
    for n, (m, err) in enumerate(rec["momentum"]):
        t = n // steps + (n % steps) / steps
        assert abs(m - utils.cosine_schedule(t, epochs, 0.9, final=1.0)) < 1e-12
        assert err < 1e-6                                   # m theta_m + (1 - m) theta, not the other way round
    ms = [m for m, _ in rec["momentum"]]
    assert ms[0] == 0.9 and all(a < b for a, b in zip(ms, ms[1:])) and ms[-1] < 1   # rises from m0 towards 1


def test_each_prediction_meets_the_other_view_s_key_in_training_mode(rec):
    assert len(rec["forward"]) == len(rec["loss"]) == 8 and all(rec["mode_ok"])
    for ((q1, q2, k1, k2), keys), ((lq1, lq2, lk1, lk2), inst) in zip(rec["forward"], rec["loss"]):
        assert torch.allclose(k1, keys[0], atol=1e-6) and torch.allclose(k2, keys[1], atol=1e-6)   # k_v is view v's
        for got, want in ((lq1, q1), (lq2, q2), (lk1, k1), (lk2, k2)):                              # passed in order
            assert torch.equal(got, want.float())
        cross = 0.5 * ((2 - 2 * (q1 * k2).sum(1)).mean() + (2 - 2 * (q2 * k1).sum(1)).mean()).item()
        same = 0.5 * ((2 - 2 * (q1 * k1).sum(1)).mean() + (2 - 2 * (q2 * k2).sum(1)).mean()).item()
        assert abs(inst - cross) < 1e-5 and abs(cross - same) > 1e-4    # eq. 12 pairs across views


def test_the_sampler_s_epoch_reaches_the_views(rec):
    epochs = [e for _, e, _ in rec["views"]]
    assert epochs == [0] * 128 + [1] * 128                  # every image once an epoch, drawn for that epoch
    first = [i for _, _, i in rec["views"][:128]]
    second = [i for _, _, i in rec["views"][128:]]
    assert sorted(first) == sorted(second) == list(range(128)) and first != second   # a new shuffle too
