"""ResNet family with the paper's B, C, D tweaks and zero-γ; a name → constructor zoo."""
from .flops import count_macs, count_params
from .resnet import BasicBlock, Bottleneck, ResNet
from .torchvision_weights import load_torchvision_state_dict
from .zoo import create_model, default_input_size, list_models, register

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "create_model", "list_models", "register",
           "count_macs", "count_params", "load_torchvision_state_dict", "default_input_size"]
