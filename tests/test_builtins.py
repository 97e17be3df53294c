"""The offline models are what they claim to be: real weights that recognise real photographs, and a
metric that can tell plans apart."""

import pytest
import torch

from worker.engine import Budget, CompressOptions, DataOptions, LatencyOptions, SensitivityOptions, compress
from worker.engine.adapters import adapt
from worker.engine.builtins import load_builtin
from worker.engine.evaluation import Evaluator
from worker.engine.photos import photographs
from worker.engine.sources import load_model
from worker.engine.spec import parse_source

EGYPTIAN_CAT_TO_TABBY = range(281, 286)  # ImageNet's domestic cats


def _centre_crop(image, size=224):
    import numpy as np
    from PIL import Image

    side = min(image.size)
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return (torch.tensor(np.asarray(crop), dtype=torch.float32).permute(2, 0, 1) - 127.0) / 128.0


@pytest.fixture(scope="module")
def efficientnet(cache_dir):
    builtin = load_builtin("efficientnet-lite0", DataOptions(calibration_samples=16, eval_samples=128,
                                                             test_samples=16), cache_dir)
    return builtin, adapt(builtin.model, builtin.task)


def test_efficientnet_lite0_has_real_imagenet_weights(efficientnet):
    _, adapter = efficientnet
    photos = photographs()
    with torch.inference_mode():
        cat = adapter(_centre_crop(photos["chelsea.png"])[None]).softmax(-1)
        espresso = adapter(_centre_crop(photos["coffee.png"])[None]).softmax(-1)
    assert int(cat.argmax()) in EGYPTIAN_CAT_TO_TABBY and float(cat.max()) > 0.3
    assert int(espresso.argmax()) == 967 and float(espresso.max()) > 0.5


def test_efficientnet_evaluation_split_is_varied_enough_for_top1(efficientnet):
    builtin, adapter = efficientnet
    evaluator = Evaluator(adapter, builtin.data, builtin.task)
    assert evaluator.metric_name == "top1_agreement"
    assert evaluator.distinct_predictions("evaluation") >= 10


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "bert-base"])
def test_random_weight_builtins_are_scored_by_a_continuous_fidelity(name, cache_dir):
    loaded = load_model(parse_source(f"builtin:{name}"), DataOptions(calibration_samples=4, eval_samples=4,
                                                                     test_samples=4, batch_size=4, seq_len=16),
                        None, cache_dir)
    evaluator = Evaluator(adapt(loaded.model, loaded.task), loaded.data, loaded.task, loaded.metric)
    assert evaluator.metric_name == "logit_cosine" and evaluator.fidelity


def test_a_top1_metric_that_cannot_discriminate_is_a_warning(cache_dir, monkeypatch):
    """A classifier that answers the same class for everything: its top-1 metric says nothing, and the
    report must say so."""
    from worker.engine import builtins

    original = builtins.BUILTINS["digits-resnet"]

    def constant_classifier(options, cache):
        built = original(options, cache)
        with torch.no_grad():
            built.model.classifier[-1].bias[0] = 1e4  # class 0 wins for every input
        return built

    monkeypatch.setitem(builtins.BUILTINS, "digits-resnet", constant_classifier)
    report = compress("builtin:digits-resnet", CompressOptions(
        budget=Budget(0.5), sensitivity=SensitivityOptions(ordering="random"),
        data=DataOptions(calibration_samples=8, eval_samples=64, test_samples=64, batch_size=8),
        latency=LatencyOptions(warmup=1, repeats=2, profile_seconds=0.05), cache_dir=cache_dir))
    assert report.metric["name"] == "top1_accuracy"
    assert any("predicts only 1 distinct class" in w for w in report.warnings)
