"""Tests for model.py: the ResNet backbone against torchvision (parameter counts, strict
weight export), head structure (MoCo v3 projector / predictor), the stop-gradient momentum
branch, the EMA update and the cosine momentum schedule. CPU only; resnet18 with small heads
and tiny images, resnet50 only for parameter counting (no forward pass).
"""

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402
from model import ModelConfig, build_backbone, mlp  # noqa: E402
from utils import UserError, cosine_schedule  # noqa: E402

DIM, HID = 16, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions are fastest on one thread; with two intra-op threads on a busy
    2-core machine a resnet18 forward was measured 30x slower (OpenMP threads waiting on
    each other). Restored afterwards so other test modules are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_BUILT = {}


def small_model(**kw):
    """A fresh resnet18 SiamMM with small heads (a deep copy of one built per config: the
    random init of 11M parameters costs more than the copy)."""
    args = dict(arch="resnet18", small_stem=True, in_chans=3, proj_hidden=HID, pred_hidden=HID, dim=DIM)
    args.update(kw)
    key = tuple(sorted(args.items()))
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = ModelConfig(**args).build()
    return copy.deepcopy(_BUILT[key])


def images(b=4, c=3, s=16, seed=0):
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def perturb(params, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- backbone vs torchvision

@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_parameter_count_equals_torchvision(arch, feat):
    ref = getattr(torchvision.models, arch)(weights=None)
    expected = n_params(ref) - n_params(ref.fc)
    net, dim = build_backbone(arch)
    assert dim == feat
    assert n_params(net) == expected
    assert {n for n, _ in net.named_parameters()} == {n for n, _ in ref.named_parameters()} - {"fc.weight", "fc.bias"}


def test_siammm_backbones_match_torchvision_count():
    m = small_model(small_stem=False)
    ref = torchvision.models.resnet18(weights=None)
    expected = n_params(ref) - n_params(ref.fc)
    assert n_params(m.backbone) == expected
    assert n_params(m.momentum_backbone) == expected
    assert m.feat_dim == 512


def test_unknown_arch_and_resnet_options_elsewhere_raise():
    """(Every torchvision classifier, 1-channel stems and sizes: tests/test_arch.py.)"""
    with pytest.raises(UserError, match="unknown --arch"):
        build_backbone("resnet_does_not_exist")
    for kw in (dict(small_stem=True), dict(width=32)):   # ResNet options on another network
        with pytest.raises(UserError, match="options of the ResNets"):
            build_backbone("mobilenet_v3_small", **kw)


def test_any_torchvision_classifier_is_a_backbone_and_gets_a_classifier_where_it_had_one():
    """Another backbone is a flag: a torchvision network loses its classifier (its last
    Linear), reports that layer's input width, and records where it was (lincls.py puts its
    own there); the SiamMM heads take the width."""
    ref = torchvision.models.mobilenet_v3_small(weights=None)
    net, dim = build_backbone("mobilenet_v3_small")
    assert net.classifier_path == "classifier.3" and dim == ref.classifier[3].in_features == 1024
    assert isinstance(net.classifier[3], nn.Identity)
    net.eval()
    with torch.no_grad():
        assert net(images(2, 3, 32)).shape == (2, dim)
    m = ModelConfig("mobilenet_v3_small", proj_hidden=HID, pred_hidden=HID, dim=DIM).build()
    assert m.feat_dim == 1024 and m.projector[0].in_features == 1024
    assert build_backbone("resnet18")[0].classifier_path == "fc"


def test_export_backbone_loads_into_torchvision():
    m = small_model(small_stem=False)
    perturb(m.backbone.parameters())                 # so that a wrong copy could not pass by chance
    sd = m.export_backbone()
    ref = torchvision.models.resnet18()
    res = ref.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"]
    assert res.unexpected_keys == []
    # exported tensors are copies (no aliasing of the live parameters) with the same values
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(sd[k], v) and sd[k].data_ptr() != v.data_ptr()
        assert not sd[k].requires_grad
    # and the torchvision network computes the same features
    ref.fc = nn.Identity()
    m.eval(), ref.eval()
    x = images(2, 3, 32)
    with torch.no_grad():
        assert torch.allclose(ref(x), m.backbone(x), atol=1e-6)


def test_export_small_stem_loads_into_build_backbone():
    # a small-stem / grayscale backbone does not fit torchvision's ImageNet conv1, but it loads
    # strictly into build_backbone with the same options (what evaluate.py does)
    m = small_model(in_chans=1)
    perturb(m.backbone.parameters())
    net, _ = build_backbone("resnet18", small_stem=True, in_chans=1)
    net.load_state_dict(m.export_backbone(), strict=True)
    m.eval(), net.eval()
    x = images(2, 1, 28)
    with torch.no_grad():
        assert torch.allclose(net(x), m.backbone(x), atol=1e-6)


@pytest.mark.parametrize("arch,expansion", [("resnet18", 1), ("resnet50", 4)])
def test_width_scales_every_stage_and_keeps_torchvision_names(arch, expansion):
    # --width 16: stages of 16, 32, 64, 128 channels (x the block's expansion), the feature
    # dimension 8 x 16 x expansion, torchvision's parameter names, a working forward
    net, dim = build_backbone(arch, small_stem=True, in_chans=1, width=16)
    ref = getattr(torchvision.models, arch)(weights=None)
    assert dim == 128 * expansion
    assert net.conv1.out_channels == 16 and net.bn1.num_features == 16
    for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        last_bn = getattr(layer[-1], "bn3", layer[-1].bn2)
        assert last_bn.num_features == 16 * 2 ** i * expansion
        assert torch.count_nonzero(last_bn.weight) == 0           # zero_init_residual survives the rebuild
    assert {n for n, _ in net.named_parameters()} == {n for n, _ in ref.named_parameters()} - {"fc.weight", "fc.bias"}
    assert n_params(net) < n_params(ref) / 10                      # about (16 / 64)^2 of the weights
    net.eval()
    with torch.no_grad():
        assert net(images(2, 1, 16)).shape == (2, dim)
    # the convs get torchvision's He init (fan_out), not PyTorch's default: std = sqrt(2 / fan_out)
    w = net.layer4[0].conv1.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() - math.sqrt(2 / fan_out)) < 0.1 * math.sqrt(2 / fan_out)


def test_bad_width_raises():
    with pytest.raises(ValueError, match="--width 0"):
        build_backbone("resnet18", width=0)


def test_zero_init_residual():
    net, _ = build_backbone("resnet18")
    for blk in [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]:
        assert torch.count_nonzero(blk.bn2.weight) == 0


def test_default_stem_is_imagenet_stem():
    net, _ = build_backbone("resnet18")
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2) and net.conv1.in_channels == 3
    assert isinstance(net.maxpool, nn.MaxPool2d)
    assert isinstance(net.fc, nn.Identity)
    net1, _ = build_backbone("resnet18", in_chans=1)
    assert net1.conv1.in_channels == 1 and net1.conv1.kernel_size == (7, 7) and net1.conv1.stride == (2, 2)


def test_small_stem():
    net, _ = build_backbone("resnet18", small_stem=True)
    c = net.conv1
    assert c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
    assert c.in_channels == 3 and c.out_channels == 64 and c.bias is None
    assert isinstance(net.maxpool, nn.Identity)


def test_small_stem_grayscale_forward():
    m = small_model(in_chans=1)
    assert m.backbone.conv1.in_channels == 1 and m.momentum_backbone.conv1.in_channels == 1
    x1, x2 = images(2, 1, 28, seed=1), images(2, 1, 28, seed=2)
    q1, q2, k1, k2 = m(x1, x2)
    for t in (q1, q2, k1, k2):
        assert t.shape == (2, DIM) and torch.isfinite(t).all()
    m.eval()
    assert m.embed(x1).shape == (2, DIM)


# ---------------------------------------------------------------- heads

def test_projector_structure():
    m = small_model()
    p = m.projector
    assert [type(l) for l in p] == [nn.Linear, nn.BatchNorm1d, nn.ReLU,
                                    nn.Linear, nn.BatchNorm1d, nn.ReLU,
                                    nn.Linear, nn.BatchNorm1d]
    lin = [l for l in p if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(512, HID), (HID, HID), (HID, DIM)]
    assert all(l.bias is None for l in lin)           # every linear feeds a BN
    bns = [l for l in p if isinstance(l, nn.BatchNorm1d)]
    assert bns[0].affine and bns[1].affine
    assert not bns[-1].affine and bns[-1].num_features == DIM   # last BN without affine (MoCo v3)


def test_predictor_structure():
    m = small_model()
    h = m.predictor
    assert [type(l) for l in h] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]   # no BN, no ReLU on output
    assert (h[0].in_features, h[0].out_features) == (DIM, HID) and h[0].bias is None
    assert (h[3].in_features, h[3].out_features) == (HID, DIM) and h[3].bias is None   # MoCo v3: no bias
    assert h[1].affine


def test_head_output_shapes():
    m = small_model()
    f = torch.randn(4, 512)
    z = m.projector(f)
    assert z.shape == (4, DIM)
    assert m.predictor(z).shape == (4, DIM)
    assert m.momentum_projector(f).shape == (4, DIM)
    # mlp() on its own: arbitrary sizes
    assert mlp(3, 7, 5, 3, last_bn=True)(torch.randn(6, 7)).shape == (6, 3)
    assert mlp(2, 3, 5, 4, last_bn=False)(torch.randn(6, 3)).shape == (6, 4)


# ---------------------------------------------------------------- forward and gradients

def test_forward_unit_norm():
    m = small_model()
    q1, q2, k1, k2 = m(images(seed=1), images(seed=2))
    for t in (q1, q2, k1, k2):
        assert t.shape == (4, DIM)
        assert torch.allclose(t.norm(dim=1), torch.ones(4), atol=1e-5)
    assert q1.requires_grad and q2.requires_grad
    assert not k1.requires_grad and not k2.requires_grad


def test_forward_matches_branch_definitions():
    # q = normalize(h(g(f(x)))), k = normalize(g_m(f_m(x))), in eval mode to make BN deterministic
    m = small_model()
    perturb(m.momentum_parameters(), seed=3)          # momentum and online differ
    m.eval()
    x1, x2 = images(seed=1), images(seed=2)
    with torch.no_grad():
        q1, q2, k1, k2 = m(x1, x2)
        q = lambda x: F.normalize(m.predictor(m.projector(m.backbone(x))), dim=1)  # noqa: E731
        k = lambda x: F.normalize(m.momentum_projector(m.momentum_backbone(x)), dim=1)  # noqa: E731
        assert torch.allclose(q1, q(x1), atol=1e-6) and torch.allclose(q2, q(x2), atol=1e-6)
        assert torch.allclose(k1, k(x1), atol=1e-6) and torch.allclose(k2, k(x2), atol=1e-6)
        assert not torch.allclose(k1, F.normalize(m.projector(m.backbone(x1)), dim=1), atol=1e-3)


def test_batchnorm_statistics_per_view():
    # in train mode q1 depends on the x1 batch only (each view runs through BN separately)
    m = small_model()
    x1 = images(seed=1)
    q1a, _, k1a, _ = m(x1, images(seed=2))
    q1b, _, k1b, _ = m(x1, 5 * images(seed=3) + 2)
    assert torch.allclose(q1a, q1b, atol=1e-5) and torch.allclose(k1a, k1b, atol=1e-5)


def test_gradients_reach_online_branch_only():
    m = small_model()
    q1, q2, k1, k2 = m(images(seed=1), images(seed=2))
    # a loss of both q and k (k carries no graph, so only q contributes a gradient)
    loss = (2 - 2 * (q1 * k2).sum(1)).mean() + (2 - 2 * (q2 * k1).sum(1)).mean() + (q1 * k1).sum()
    loss.backward()
    for name, mod in (("backbone", m.backbone), ("projector", m.projector), ("predictor", m.predictor)):
        grads = [p.grad for p in mod.parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    for p in m.momentum_parameters():
        assert p.grad is None and not p.requires_grad


def test_online_parameters():
    m = small_model()
    online = {id(p) for p in m.online_parameters()}
    expected = {id(p) for mod in (m.backbone, m.projector, m.predictor) for p in mod.parameters()}
    assert online == expected
    assert len(m.online_parameters()) == len(expected)
    assert online.isdisjoint({id(p) for p in m.momentum_parameters()})
    assert all(p.requires_grad for p in m.online_parameters())
    assert {id(p) for p in m.parameters()} == online | {id(p) for p in m.momentum_parameters()}


# ---------------------------------------------------------------- momentum encoder

def online_pairs(m):
    """(online, momentum) parameter pairs, matched by name."""
    mom = dict(m.momentum_backbone.named_parameters(prefix="backbone"))
    mom.update(m.momentum_projector.named_parameters(prefix="projector"))
    on = dict(m.backbone.named_parameters(prefix="backbone"))
    on.update(m.projector.named_parameters(prefix="projector"))
    assert on.keys() == mom.keys()
    return [(on[k], mom[k]) for k in on]


def test_momentum_starts_as_copy():
    m = small_model()
    for p, pm in online_pairs(m):
        assert torch.equal(p, pm) and p.data_ptr() != pm.data_ptr()
    for (n, b), (nm, bm) in zip(m.backbone.named_buffers(), m.momentum_backbone.named_buffers()):
        assert n == nm and torch.equal(b, bm)
    # independent copies: changing the online branch leaves the momentum branch alone
    perturb(m.backbone.parameters())
    assert not all(torch.equal(p, pm) for p, pm in online_pairs(m))


@pytest.mark.parametrize("mom", [0.99, 0.9, 0.5, 0.0])
def test_update_momentum_is_ema(mom):
    m = small_model()
    perturb(m.online_parameters(), seed=1)
    perturb(m.momentum_parameters(), seed=2)
    pairs = online_pairs(m)
    old = [pm.detach().clone() for _, pm in pairs]
    online_before = [p.detach().clone() for p, _ in pairs]
    m.update_momentum(mom)
    for (p, pm), o, ob in zip(pairs, old, online_before):
        assert torch.allclose(pm, mom * o + (1 - mom) * p, atol=1e-6, rtol=1e-6)
        assert torch.equal(p, ob)                      # the online branch is not touched
        assert not pm.requires_grad


def test_update_momentum_one_is_identity():
    m = small_model()
    perturb(m.online_parameters(), seed=1)
    before = [p.detach().clone() for p in m.momentum_parameters()]
    m.update_momentum(1.0)
    for p, b in zip(m.momentum_parameters(), before):
        assert torch.equal(p, b)


def test_update_momentum_leaves_predictor_alone():
    m = small_model()
    before = [p.detach().clone() for p in m.predictor.parameters()]
    perturb(m.momentum_parameters(), seed=2)
    m.update_momentum(0.5)
    for p, b in zip(m.predictor.parameters(), before):
        assert torch.equal(p, b)


def test_momentum_schedule():
    """MoCo v3 / BYOL: m(t) = 1 - (1 - m0)(1 + cos(pi t / T)) / 2, from m0 to 1 (the shared
    cosine schedule, with final = 1 and no warm-up, as train.py calls it)."""
    def momentum_at(t, T, m0):
        return cosine_schedule(t, T, m0, final=1.0)
    m0, T = 0.99, 100
    assert momentum_at(0, T, m0) == pytest.approx(m0, abs=1e-15)
    assert momentum_at(T, T, m0) == pytest.approx(1.0, abs=1e-15)
    assert momentum_at(T / 2, T, m0) == pytest.approx(1 - (1 - m0) / 2, abs=1e-15)
    for t in (0.0, 1.3, 17.25, 50.0, 83.0, 99.9):
        exp = 1 - (1 - m0) * (1 + math.cos(math.pi * t / T)) / 2
        assert momentum_at(t, T, m0) == pytest.approx(exp, abs=1e-15)
    ms = [momentum_at(T * i / 50, T, m0) for i in range(51)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))     # non-decreasing from m0 to 1
    assert momentum_at(3, 10, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(0.3 * math.pi)) / 2)


# ---------------------------------------------------------------- embed

def test_embed_uses_momentum_branch_without_grad():
    m = small_model()
    perturb(m.momentum_parameters(), seed=3)
    m.eval()
    x = images(seed=5)
    z = m.embed(x, bn="running")
    assert z.shape == (4, DIM) and not z.requires_grad
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        _, _, k1, _ = m(x, x)
    assert torch.allclose(z, k1, atol=1e-6)
    # changing the online branch does not change embed(), changing the momentum one does
    perturb(m.online_parameters(), seed=4)
    assert torch.allclose(m.embed(x, bn="running"), z, atol=1e-6)
    perturb(m.momentum_parameters(), seed=6)
    assert not torch.allclose(m.embed(x, bn="running"), z, atol=1e-4)


def test_embed_batch_statistics_equal_the_training_targets_and_change_nothing():
    """embed(bn="batch") on a model in eval mode gives exactly the momentum targets k of a
    training step on the same batch, and leaves every BN buffer and mode as it was."""
    m = small_model()
    perturb(m.momentum_parameters(), seed=3)
    for mod in m.modules():   # running statistics far from any batch's, as after training on crops
        if isinstance(mod, nn.BatchNorm1d) or isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.fill_(0.5)
            mod.running_var.fill_(3.0)
    m.eval()
    buffers = {k: v.clone() for k, v in m.state_dict().items()}
    x = images(seed=5)
    z = m.embed(x)                                  # the default: batch statistics
    assert all(torch.equal(buffers[k], v) for k, v in m.state_dict().items())
    assert not any(mod.training for mod in m.modules())
    assert not torch.allclose(z, m.embed(x, bn="running"), atol=1e-3)
    m.train()
    with torch.no_grad():
        _, _, k1, _ = m(x, x)
    assert torch.allclose(z, k1, atol=1e-5)
    # the pre-normalisation output of the projector's last BN is standardised per dimension
    with torch.no_grad(), model.batch_statistics(m.momentum_backbone, m.momentum_projector):
        h = m.momentum_projector(m.momentum_backbone(x))
    assert torch.allclose(h.mean(0), torch.zeros(DIM), atol=1e-4)


def test_everything_on_cpu():
    m = small_model()
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert all(b.device.type == "cpu" for b in m.buffers())
    q1, _, k1, _ = m(images(2), images(2, seed=1))
    assert q1.device.type == "cpu" and k1.device.type == "cpu"
