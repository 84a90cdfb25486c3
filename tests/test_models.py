import builtins

import pytest
import torch
from torch import nn

from knnsolver.errors import ConfigError, MissingDependencyError
from knnsolver.models import build_model
from knnsolver.training import TrainConfig, train


@pytest.mark.parametrize(
    "name, shape, cls",
    [("auto", (1, 8, 8), "ConvNet8"), ("auto", (1, 28, 28), "ConvNet28"), ("auto", (3, 32, 32), "ConvNet28"),
     ("auto", (1, 32, 20), "ConvNet28"), ("auto", (3, 72, 72), "ResNetSmall"),
     ("auto", (20,), "MLPNet"), ("mlp", (1, 8, 8), "MLPNet"), ("resnet", (3, 16, 16), "ResNetSmall")],
)
def test_networks_map_inputs_to_embeddings(name, shape, cls):
    model = build_model(name, shape, embedding_dim=12, dropout=0.1, width=8)
    assert type(model).__name__ == cls
    out = model.eval()(torch.rand(3, *shape))
    assert out.shape == (3, 12)
    assert (out < 0).any(), "the embedding layer has no final ReLU"
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("shape, rows, expected", [
    ((1, 8, 8), 1_000, "conv8"), ((1, 28, 28), 60_000, "conv28"), ((1, 32, 32), 18_000, "conv28"),
    ((3, 32, 32), 50_000, "conv28"), ((3, 224, 224), 10_000, "resnet"), ((3, 224, 224), 500, "conv28"),
    ((3, 224, 224), None, "resnet"), ((64,), 100, "mlp"),
])
def test_auto_chooses_by_input_and_data_size(shape, rows, expected):
    from knnsolver.models.factory import choose_model

    name, reason = choose_model(shape, rows)
    assert name == expected and reason
    model = build_model("auto", shape, embedding_dim=8, width=4, num_train=rows)
    assert type(model).__name__ == {"conv8": "ConvNet8", "conv28": "ConvNet28", "resnet": "ResNetSmall",
                                    "mlp": "MLPNet"}[expected]


def test_pretrained_weights_are_loaded_and_checked(tmp_path):
    a = build_model("conv8", (1, 8, 8), 10, width=8)
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b = build_model("conv8", (1, 8, 8), 10, width=8, pretrained=str(path))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="bad.pt do not fit the conv8 network: 20 tensors missing"):
        build_model("conv8", (1, 8, 8), 10, pretrained=str(tmp_path / "bad.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("conv8", (1, 8, 8), 10, pretrained=str(tmp_path / "missing.pt"))


def test_timm_missing_gives_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ModuleNotFoundError("No module named 'timm'", name="timm")  # what Python raises
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        build_model("timm:resnet18", (3, 32, 32), 16)


def test_unknown_model_and_shape():
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        build_model("vgg", (1, 8, 8), 8)
    with pytest.raises(ConfigError, match="cannot choose a network for input shape"):
        build_model("auto", (2, 3), 8)


def test_any_user_module_is_a_backbone(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    before = net[1].weight.detach().clone()
    summary = train(TrainConfig(epochs=3, lr=0.01, lr_schedule="constant", out=str(tmp_path / "r"), embedding_dim=16, progress=False,
                                plots=False), model=net)
    assert summary["test_accuracy"] > 0.85
    assert not torch.equal(before, net[1].weight), "the user's module itself is trained"
