"""--arch over every torchvision classifier (torchvision.models.list_models): each one either
trains as a SiamMM backbone at the sizes model.check_arch accepts, or is refused in one
line before training. CPU only, about 30 s:

- the decision (check_arch), for every classifier, at the CPU preset's 16 px and at the
  ImageNet presets' 224 px, and with the ResNet-only options;
- every classifier except the RegNets, built on the meta device (shapes, no memory, no
  arithmetic) with a 1-channel stem and run at its family's smallest accepted size: the
  output is the feature vector (2, dim), and no dropout is left. torchvision's RegNet
  builders compute their widths with tensors, which the meta device cannot; its family
  has only padded convs and adaptive pooling (any size), and its representative runs below;
- one representative per family, really built (CPU) and trained one step: forward and
  backward in training mode, batch 2, 1 channel, at its family's smallest size; then the
  linear classifier that lincls.py puts at classifier_path.
"""

import fnmatch
import re

import pytest
import torch
import torch.nn as nn
import torchvision

import model
import train
from model import FIXED_SIZE, MIN_SIZE, ModelConfig, build_backbone, check_arch, family
from test_train import TINY, error_line
from utils import UserError

CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# the smallest of each family (the real forward and backward)
REPRESENTATIVE = {"resnet": "resnet18", "regnet": "regnet_x_400mf", "efficientnet": "efficientnet_b0",
                  "mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3_small", "mnasnet": "mnasnet0_5",
                  "shufflenetv2": "shufflenet_v2_x0_5", "swin_transformer": "swin_t", "googlenet": "googlenet",
                  "squeezenet": "squeezenet1_0", "densenet": "densenet121", "vgg": "vgg11", "convnext": "convnext_tiny",
                  "alexnet": "alexnet", "inception": "inception_v3", "vision_transformer": "vit_b_32",
                  "maxvit": "maxvit_t"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions run fastest on one thread on a busy 2-core machine (test_model.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smallest(arch):
    fam = family(arch)
    return FIXED_SIZE.get(fam) or MIN_SIZE[fam]


def refusal(**kw):
    """check_arch's refusal: a UserError of one line that names the arch."""
    with pytest.raises(UserError) as e:
        check_arch(**kw)
    msg = str(e.value)
    assert "\n" not in msg and kw["arch"] in msg
    return msg


def test_every_family_is_in_the_tables():
    """A family that torchvision adds later is refused until it is measured here."""
    families = {family(a) for a in CLASSIFIERS}
    assert families == set(MIN_SIZE) | set(FIXED_SIZE) == set(REPRESENTATIVE)
    globs = re.findall(r"[a-z][a-z0-9_]*\*?", model.ARCH_HELP)
    assert all(any(fnmatch.fnmatch(a, g) for g in globs) for a in CLASSIFIERS)   # --help names every one


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_decision(arch):
    resnet = family(arch) == "resnet"
    assert model.is_resnet(arch) == resnet
    for size in (16, 224):   # the CPU preset's images, and ImageNet's
        fixed, low = FIXED_SIZE.get(family(arch)), MIN_SIZE.get(family(arch), 0)
        if (fixed or size) == size and size >= low:
            check_arch(arch, img_size=size)
        else:
            msg = refusal(arch=arch, img_size=size)
            assert f"--img-size {fixed or low}" in msg and "resnet" in msg   # the size it needs, and what runs here
    if resnet:
        check_arch(arch, small_stem=True, width=16, img_size=16)
    else:
        for kw in (dict(small_stem=True), dict(width=16)):
            assert "options of the ResNets" in refusal(arch=arch, **kw)


def test_unknown_arch_is_refused_naming_what_exists():
    assert "resnet*" in refusal(arch="resnet_does_not_exist")


@pytest.mark.parametrize("arch", [a for a in CLASSIFIERS if family(a) != "regnet"])
def test_every_classifier_runs_at_its_smallest_size(arch):
    s = smallest(arch)
    check_arch(arch, img_size=s)
    with torch.device("meta"):
        net, dim = build_backbone(arch, in_chans=1)
        assert net.train()(torch.empty(2, 1, s, s)).shape == (2, dim)
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())


@pytest.mark.parametrize("fam", sorted(f for f in MIN_SIZE if MIN_SIZE[f] > 1))
def test_the_smallest_size_is_needed(fam):
    """One pixel less and the representative fails: the table refuses nothing that runs."""
    s = MIN_SIZE[fam] - 1
    with torch.device("meta"):
        net, _ = build_backbone(REPRESENTATIVE[fam], in_chans=1)
        with pytest.raises(RuntimeError):
            net.train()(torch.empty(2, 1, s, s))


@pytest.mark.parametrize("fam", sorted(REPRESENTATIVE))
def test_one_per_family_trains_at_its_smallest_size_in_one_channel(fam):
    arch = REPRESENTATIVE[fam]
    s = smallest(arch)
    torch.manual_seed(0)
    net, dim = build_backbone(arch, in_chans=1)
    y = net.train()(torch.randn(2, 1, s, s))
    assert y.shape == (2, dim) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.set_submodule(net.classifier_path, nn.Linear(dim, 10))   # lincls.py's classifier, where the old one was
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 1, s, s)).shape == (2, 10)


def test_a_siammm_of_another_family_trains():
    m = ModelConfig("mobilenet_v3_small", in_chans=1, proj_hidden=32, pred_hidden=32, dim=16).build()
    x1, x2 = torch.randn(2, 2, 1, 16, 16)
    q1, q2, k1, k2 = m(x1, x2)
    assert q1.shape == k1.shape == (2, 16)
    (q1 * k2).sum().neg().add((q2 * k1).sum().neg()).backward()
    assert all(p.grad is not None for p in m.online_parameters())


def test_train_refuses_before_any_data_and_leaves_the_presets_resnet_options_out(tmp_path, capsys):
    """The CPU preset's --small-stem and --width 16 are not filled into another network;
    the same flags given are refused, as is a size the network cannot run at."""
    args = train.get_args(["--arch", "mobilenet_v3_small"])
    assert (args.small_stem, args.width, args.img_size) == (False, 64, 16)
    assert train.get_args([]).width == 16 and train.get_args(["--arch", "resnet50"]).small_stem
    out = str(tmp_path / "o")
    for flags, needle in ((["--arch", "vgg11"], "--arch vgg11 needs --img-size 32 or more"),
                          (["--arch", "vit_b_16"], "--arch vit_b_16 runs at --img-size 224 only"),
                          (["--arch", "densenet121", "--img-size", "32", "--width", "16"], "options of the ResNets"),
                          (["--arch", "nope"], "unknown --arch 'nope'")):
        assert needle in error_line(capsys, TINY + ["--out-dir", out] + flags)   # TINY: 16 px, Fashion-MNIST
    assert not (tmp_path / "o").exists()
