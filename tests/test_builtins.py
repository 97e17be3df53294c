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


def test_efficientnet_default_data_is_varied_and_scored_by_a_continuous_fidelity(efficientnet):
    builtin, adapter = efficientnet
    evaluator = Evaluator(adapter, builtin.default_data(), builtin.task, builtin.metric)
    assert evaluator.metric_name == "logit_cosine" and evaluator.fidelity
    assert evaluator.distinct_predictions("evaluation") >= 10


def test_an_imagenet_folder_is_labelled_by_sorted_wordnet_ids_and_prepared_as_the_model_was_trained(
        cache_dir, tmp_path):
    """foolbox's 20 labelled ImageNet photographs (class index in the file name) in a 1000-folder WordNet
    layout: each lands on its class, so the real EfficientNet-Lite0 recognises most of them; shifted labels
    or the wrong preprocessing would score near zero."""
    import importlib.util
    import shutil
    from pathlib import Path

    photos = sorted(Path(importlib.util.find_spec("foolbox").submodule_search_locations[0], "data")
                    .glob("imagenet_*.jpg"))
    assert len(photos) == 20
    for index in range(1000):
        (tmp_path / "imagenet" / f"n{index:08d}").mkdir(parents=True)
    for photo in photos:
        shutil.copy(photo, tmp_path / "imagenet" / f"n{int(photo.stem.split('_')[-1]):08d}" / photo.name)
    data = DataOptions(spec="imagenet", calibration_samples=4, eval_samples=12, test_samples=4, batch_size=4)
    loaded = load_model(parse_source("builtin:efficientnet-lite0"), data, tmp_path, cache_dir)
    evaluator = Evaluator(adapt(loaded.model, loaded.task), loaded.data, loaded.task, loaded.metric)
    assert evaluator.metric_name == "top1_accuracy" and loaded.data.calibration[0]["pixel_values"].shape[1:] == (
        3, 224, 224)
    labels = sorted(int(label) for split in ("calibration", "evaluation", "test")
                    for batch in getattr(loaded.data, split) for label in batch["labels"])
    assert labels == sorted(int(photo.stem.split("_")[-1]) for photo in photos)
    correct = [score for split in ("calibration", "evaluation", "test") for score in evaluator.scores(
        adapt(loaded.model, loaded.task), split)]
    assert sum(correct) >= 15, correct


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


def test_minilm_sentiment_is_a_real_classifier_on_sentences_it_never_trained_on(cache_dir):
    """Fine-tuned once on 5,000 Rotten Tomatoes sentences (cached); every split of a job comes from the other
    3,530. A frozen-embedding linear classifier gets about 68% there: fine-tuning must do clearly better."""
    from worker.engine.builtins import _sentiment_split

    builtin = load_builtin("minilm-sentiment", DataOptions(calibration_samples=16, eval_samples=256,
                                                           test_samples=16, seq_len=64), cache_dir)
    data = builtin.default_data()
    evaluator = Evaluator(adapt(builtin.model, builtin.task), data, builtin.task)
    assert evaluator.metric_name == "top1_accuracy" and evaluator.metric(adapt(builtin.model, builtin.task)) > 0.72
    (train, _), (held_out, _) = _sentiment_split()
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 8530
