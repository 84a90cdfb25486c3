"""Backbones ending in an embedding layer; any ``nn.Module`` a user passes works too."""
from knnsolver.models.backbones import VGG16, ResNet, load_torchvision_weights, resnet18, resnet50, vgg16
from knnsolver.models.factory import build_model
from knnsolver.models.nets import ConvNet8, ConvNet28, MLPNet, ResNetSmall

__all__ = ["build_model", "ConvNet8", "ConvNet28", "MLPNet", "ResNetSmall", "ResNet", "VGG16", "load_torchvision_weights",
           "resnet18", "resnet50", "vgg16"]
