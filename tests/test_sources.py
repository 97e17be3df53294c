import pytest
import torch

from conftest import save_tiny_bert
from worker.engine.data import DataOptions
from worker.engine.errors import InputError
from worker.engine.sources import load_model
from worker.engine.spec import LOAD_KWARGS, directory_revision, parse_source, resolve_revision


@pytest.mark.parametrize("source, expected", [
    ("hf:bert-base-uncased", ("hf", "bert-base-uncased", None)),
    ("hf:google/mobilenet_v2_1.0_224@main", ("hf", "google/mobilenet_v2_1.0_224", "main")),
    ("hf:microsoft/resnet-50@a1b2c3d", ("hf", "microsoft/resnet-50", "a1b2c3d")),
    ("builtin:digits-resnet", ("builtin", "digits-resnet", None)),
    ("local:models/bert", ("local", "models/bert", None)),
    ("models/bert", ("local", "models/bert", None)),
])
def test_parse_valid_sources(source, expected):
    spec = parse_source(source)
    assert (spec.kind, spec.id, spec.revision) == expected


@pytest.mark.parametrize("source, message", [
    ("", "empty"),
    ("builtin:gpt5", "unknown builtin"),
    ("hf:../../etc/passwd", "invalid Hugging Face model ID"),
    ("hf:org/name/extra", "invalid Hugging Face model ID"),
    ("hf:org/..", "invalid Hugging Face model ID"),
    ("hf:bert@../../x", "invalid revision"),
    ("s3:bucket/model", "unknown model source"),
    ("local:", "needs a directory"),
])
def test_parse_invalid_sources(source, message):
    with pytest.raises(InputError, match=message):
        parse_source(source)


def test_loading_never_trusts_remote_code_and_reads_only_local_files():
    assert LOAD_KWARGS == {"trust_remote_code": False, "local_files_only": True}


def test_local_model_under_root_loads_with_labelled_jsonl(tmp_path, cache_dir):
    root = tmp_path / "root"
    save_tiny_bert(root / "models" / "tiny")
    rows = [f'{{"text": "sentence number {i}", "label": {i % 2}}}' for i in range(60)]
    (root / "data.jsonl").write_text("\n".join(rows))
    loaded = load_model(parse_source("local:models/tiny"),
                        DataOptions(spec="data.jsonl", calibration_samples=16, eval_samples=24, test_samples=20,
                                    seq_len=16), root, cache_dir)
    assert loaded.task == "sequence-classification"
    assert loaded.revision.startswith("sha256:")
    assert loaded.data.labelled and loaded.data.sizes == {"calibration": 16, "evaluation": 24, "test": 20}
    assert loaded.data.calibration[0]["input_ids"].shape == (8, 16)
    # The registry's revision (resolved without loading) is the one the loaded model reports.
    assert resolve_revision(parse_source("local:models/tiny"), root) == loaded.revision
    assert resolve_revision(parse_source("builtin:digits-resnet"), None) == "digits-resnet-v1"


def test_paths_escaping_the_root_are_refused(tmp_path, cache_dir):
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    for path in ["../outside", str(tmp_path / "outside"), "link", "inside/../../outside"]:
        with pytest.raises(InputError, match="names nothing under the allowed root"):
            load_model(parse_source(f"local:{path}"), DataOptions(), root, cache_dir)
    with pytest.raises(InputError, match="MIXQ_MODEL_ROOT"):
        load_model(parse_source("local:inside"), DataOptions(), None, cache_dir)
    with pytest.raises(InputError, match="names nothing under the allowed root"):
        load_model(parse_source("builtin:digits-resnet"), DataOptions(spec="../secrets.jsonl"), root, cache_dir)


def test_directory_revision_changes_with_weights(tmp_path):
    save_tiny_bert(tmp_path)
    before = directory_revision(tmp_path)
    assert before == directory_revision(tmp_path)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace("32", "33", 1))
    assert directory_revision(tmp_path) != before


def test_model_without_data_needs_explicit_synthetic_flag(tmp_path, cache_dir):
    save_tiny_bert(tmp_path / "m")
    with pytest.raises(InputError, match="--synthetic-data"):
        load_model(parse_source("local:m"), DataOptions(), tmp_path, cache_dir)
    loaded = load_model(parse_source("local:m"), DataOptions(synthetic=True, calibration_samples=8, eval_samples=8,
                                                             seq_len=8), tmp_path, cache_dir)
    assert loaded.data.synthetic and not loaded.data.labelled
    assert torch.all(loaded.data.calibration[0]["input_ids"] < 30522)
