"""Torch-only ImageNet backbones with torchvision's parameter names, timm's import and weights, per-layer rates."""
from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from torch import nn

from knnsolver.errors import ConfigError, MissingDependencyError
from knnsolver.models import build_model
from knnsolver.models.backbones import IMAGENET_MEAN, IMAGENET_STD, InputNormalize, resnet18, resnet50, vgg16
from knnsolver.training.lr_groups import parameter_groups

# Parameter counts torchvision documents for its ImageNet models (1000-way classifier included).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg16": 138_357_544}
CLASSIFIER = {"resnet18": ("fc", 512), "resnet50": ("fc", 2048), "vgg16": ("classifier.6", 4096)}


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet18_state_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision's ``resnet18().state_dict()`` names and shapes, written out from its architecture."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    c_in = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            shapes[f"{p}.conv1.weight"] = (c, c_in if b == 0 else c, 3, 3)
            shapes.update(_bn(f"{p}.bn1", c))
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes.update(_bn(f"{p}.bn2", c))
            if b == 0 and stage > 1:
                shapes[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", c))
        c_in = c
    shapes.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    return shapes


def fake_torchvision_file(tmp_path, shapes: dict[str, tuple[int, ...]], name: str = "resnet18-f37072fd.pth"):
    """A state dict file with torchvision's names and shapes and random values."""
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked")
                 else torch.randn(s, generator=g)) for k, s in shapes.items()}
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def test_resnet18_loads_a_torchvision_state_dict_with_every_key_matched(tmp_path):
    shapes = torchvision_resnet18_state_shapes()
    path, state = fake_torchvision_file(tmp_path, shapes)
    model = build_model("resnet18", (3, 32, 32), embedding_dim=16, pretrained=str(path))
    own = model.state_dict()
    backbone = {k for k in own if not k.startswith("head.")}
    assert backbone == set(shapes) - {"fc.weight", "fc.bias"}, "same names as torchvision, the classifier replaced"
    for k in backbone:
        assert torch.equal(own[k], state[k]), k
    assert own["head.1.weight"].shape == (16, 512)


def test_loads_from_torchvision_where_it_imports(tmp_path):
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed here")
    try:
        from torchvision.models import resnet18 as tv_resnet18
    except Exception as exc:  # installed but built for another torch
        pytest.skip(f"torchvision does not import: {exc}")
    state = tv_resnet18().state_dict()
    torch.save(state, tmp_path / "tv.pth")
    model = build_model("resnet18", (3, 32, 32), 8, pretrained=str(tmp_path / "tv.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if not k.startswith("fc."))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_parameter_count_is_torchvisions(name):
    with torch.device("meta"):  # no memory for VGG's 138 M parameters
        model = {"resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16}[name](embedding_dim=8)
    head = sum(p.numel() for p in model.head.parameters())
    prefix, features = CLASSIFIER[name]
    assert model.classifier_prefix == prefix + "."
    assert sum(p.numel() for p in model.parameters()) - head + features * 1000 + 1000 == TORCHVISION_PARAMS[name]


def test_embedding_head_after_pooling_with_dropout_and_no_relu():
    model = build_model("resnet18", (3, 32, 32), embedding_dim=12, dropout=0.3)
    assert [type(m) for m in model.head] == [nn.Flatten, nn.Dropout, nn.Linear]
    out = model.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 12) and (out < 0).any()
    norm = model.input_norm
    assert isinstance(norm, InputNormalize)
    assert torch.allclose(norm.mean.flatten(), torch.tensor(IMAGENET_MEAN)) and torch.allclose(norm.std.flatten(), torch.tensor(IMAGENET_STD))
    assert not any(k.startswith("input_norm") for k in model.state_dict()), "statistics are not saved"
    grey = build_model("resnet18", (1, 32, 32), embedding_dim=4)
    assert isinstance(grey.input_norm, nn.Identity) and grey(torch.rand(2, 1, 32, 32)).shape == (2, 4)


def test_pretrained_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass --pretrained the path of a downloaded torchvision resnet18"):
        build_model("resnet18", (3, 32, 32), 8, pretrained=str(tmp_path / "none.pth"))
    shapes = torchvision_resnet18_state_shapes()
    del shapes["layer4.1.conv2.weight"]
    shapes["extra.weight"] = (3,)
    shapes["conv1.weight"] = (64, 1, 7, 7)
    path, _ = fake_torchvision_file(tmp_path, shapes, "bad.pth")
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", (3, 32, 32), 8, pretrained=str(path))
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing (first layer4.1.conv2.weight)" in message and "1 unexpected (first extra.weight)" in message
    assert "1 of the wrong shape (first conv1.weight: (64, 1, 7, 7) in the file, (64, 3, 7, 7) here)" in message
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        build_model("resnet18", (3, 32, 32), 8, pretrained=str(tmp_path / "junk.pth"))


def _fake_timm(tmp_path, monkeypatch, body: str) -> None:
    """Put a package named timm whose ``__init__`` is ``body`` first on the import path."""
    package = tmp_path / "fake" / "timm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "timm", raising=False)


def test_timm_failing_on_torchvision_is_reported_as_such(tmp_path, monkeypatch):
    _fake_timm(tmp_path, monkeypatch, """
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")  # as timm 1.0 without torchvision
    """)
    with pytest.raises(MissingDependencyError, match="timm is installed but cannot be imported: it needs the module 'torchvision'"):
        build_model("timm:resnet18", (3, 32, 32), 16)


def test_timm_with_a_broken_torchvision_is_reported_as_such(tmp_path, monkeypatch):
    _fake_timm(tmp_path, monkeypatch, """
        raise RuntimeError("operator torchvision::nms does not exist\\nmore detail")
    """)
    with pytest.raises(MissingDependencyError) as err:
        build_model("timm:resnet18", (3, 32, 32), 16)
    assert "failed to import (RuntimeError: operator torchvision::nms does not exist)" in str(err.value)
    assert "matching torchvision" in str(err.value) and "\n" not in str(err.value)


def test_timm_local_weights_and_its_own_normalisation(tmp_path, monkeypatch):
    _fake_timm(tmp_path, monkeypatch, """
        import torch
        from torch import nn
        calls = []

        class Net(nn.Module):
            def __init__(self, num_classes, in_chans, drop_rate):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.fc = nn.Linear(4, num_classes)
                self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

            def get_classifier(self):
                return self.fc

            def forward(self, x):
                return self.fc(self.body(x))

        def create_model(name, pretrained=False, pretrained_cfg_overlay=None, **kwargs):
            calls.append((name, pretrained, pretrained_cfg_overlay, kwargs))
            net = Net(**kwargs)
            if pretrained:
                net.body.load_state_dict(torch.load(pretrained_cfg_overlay["file"]))
            return net
    """)
    weights = tmp_path / "w.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict(), weights)
    model = build_model("timm:tiny", (3, 16, 16), 6, dropout=0.2, pretrained=str(weights))
    import timm

    assert timm.calls == [("tiny", True, {"file": str(weights)}, {"num_classes": 6, "in_chans": 3, "drop_rate": 0.2})]
    assert torch.equal(model.net.body[0].weight, torch.load(weights)["0.weight"])
    assert torch.allclose(model.input_norm.mean.flatten(), torch.tensor(0.5)) and model.head is model.net.fc
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 6)
    with pytest.raises(ConfigError, match="does not exist; pass --pretrained the path of the timm tiny weights"):
        build_model("timm:tiny", (3, 16, 16), 6, pretrained=str(tmp_path / "none.pth"))


def test_backbone_lr_groups():
    model, solver = build_model("resnet18", (3, 32, 32), 8), nn.Linear(8, 3)
    one = parameter_groups(model, solver, 1e-3, None)
    assert len(one) == 1 and one[0]["lr_scale"] == 1.0
    assert one[0]["params"] == [*model.parameters(), *solver.parameters()]
    backbone, new = parameter_groups(model, solver, 1e-3, 1e-4)
    assert backbone["lr"] == 1e-4 and backbone["lr_scale"] == pytest.approx(0.1)
    assert new["lr"] == 1e-3 and new["params"] == [*model.head.parameters(), *solver.parameters()]
    assert len(backbone["params"]) + len(list(model.head.parameters())) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="backbone_lr needs to know the embedding layer of Sequential"):
        parameter_groups(nn.Sequential(nn.Linear(2, 2)), solver, 1e-3, 1e-4)
    with pytest.raises(ConfigError, match="backbone_lr must be > 0"):
        parameter_groups(model, solver, 1e-3, 0.0)
