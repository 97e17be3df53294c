import numpy as np
import pytest
import torch

from worker.engine.adapters import IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION
from worker.engine.data import (DataOptions, Preprocessing, class_indices, load_dataset_for, parse_hf_dataset_id,
                                split_batches)
from worker.engine.errors import InputError


def test_calibration_evaluation_and_test_are_disjoint_and_sized():
    x = torch.arange(100).float()[:, None]
    data = split_batches({"x": x}, torch.zeros(100, dtype=torch.long),
                         DataOptions(calibration_samples=30, eval_samples=40, test_samples=20, batch_size=8), "ids")
    values = {split: set(torch.cat([b["x"] for b in getattr(data, split)]).flatten().tolist())
              for split in ("calibration", "evaluation", "test")}
    assert {split: len(v) for split, v in values.items()} == {"calibration": 30, "evaluation": 40, "test": 20}
    assert not values["calibration"] & values["evaluation"]
    assert not values["test"] & (values["calibration"] | values["evaluation"])
    assert data.labelled


@pytest.mark.parametrize("n", [3, 4, 10, 50])
def test_small_data_shrinks_splits_instead_of_overlapping(n):
    data = split_batches({"x": torch.arange(n).float()[:, None]}, None,
                         DataOptions(calibration_samples=100, eval_samples=20, test_samples=20), "ids")
    assert sum(data.sizes.values()) == n
    assert min(data.sizes.values()) >= 1


def test_too_little_data_for_three_splits_is_a_clear_error():
    with pytest.raises(InputError, match="need at least 3"):
        split_batches({"x": torch.arange(2).float()[:, None]}, None, DataOptions(), "ids")


def test_npz_and_image_folder(tmp_path, cache_dir):
    from PIL import Image

    np.savez(tmp_path / "d.npz", pixel_values=np.random.rand(12, 1, 8, 8).astype("float32"),
             labels=np.arange(12) % 3)
    data = load_dataset_for(IMAGE_CLASSIFICATION, DataOptions(spec="d.npz", calibration_samples=4, eval_samples=6,
                                                              test_samples=2), tmp_path, cache_dir)
    assert data.labelled and data.calibration[0]["pixel_values"].shape[1:] == (1, 8, 8)

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(tmp_path / "imgs" / label / f"{i}.png")

    class Processor:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1)
                                                 for im in images])}

    images = DataOptions(spec="imgs", calibration_samples=2, eval_samples=2, test_samples=2)
    classes = {"label2id": {"Dog": 0, "cat": 1}, "num_labels": 2}  # not the folders' sorted order
    with pytest.raises(InputError, match="no image processor to prepare images; use an .npz"):
        load_dataset_for(IMAGE_CLASSIFICATION, images, tmp_path, cache_dir, Preprocessing(**classes))
    data = load_dataset_for(IMAGE_CLASSIFICATION, images, tmp_path, cache_dir,
                            Preprocessing(load_image_processor=Processor, **classes))
    by_label = {}
    for batch in data.calibration + data.evaluation + data.test:
        for pixels, label in zip(batch["pixel_values"], batch["labels"]):
            by_label.setdefault(int(label), set()).add(int(pixels[0, 0, 0]))
    # Each folder's images carry the model's own index for its name (cat -> 1, dog -> 0), whatever the order.
    assert by_label == {0: {0, 40, 80}, 1: {0, 40, 80}}
    with pytest.raises(InputError, match=r"class folders \['cat', 'dog'\] are not labels of the model"):
        load_dataset_for(IMAGE_CLASSIFICATION, images, tmp_path, cache_dir,
                         Preprocessing(load_image_processor=Processor, label2id={"LABEL_0": 0, "LABEL_1": 1}))


def test_class_folders_map_by_the_models_labels_or_the_full_imagenet_layout():
    wordnet = [f"n{index:08d}" for index in range(1000)]
    shuffled = wordnet[500:] + wordnet[:500]
    assert class_indices(shuffled, None, 1000) == {name: int(name[1:]) for name in wordnet}  # sorted = index
    with pytest.raises(InputError, match="100 WordNet-id folders for a model with 1000 classes"):
        class_indices(wordnet[:100], None, 1000)  # a subset cannot be placed by sorting
    with pytest.raises(InputError, match="1000 WordNet-id folders for a model with 10 classes"):
        class_indices(wordnet, None, 10)
    assert class_indices(["0", "7"], {str(d): d for d in range(10)}, 10) == {"0": 0, "7": 7}


def test_csv_needs_its_text_column(tmp_path, cache_dir):
    (tmp_path / "d.csv").write_text("sentence,label\nhello,1\nworld,0\n")
    with pytest.raises(InputError, match="no column 'text'"):
        load_dataset_for(SEQUENCE_CLASSIFICATION, DataOptions(spec="d.csv"), tmp_path, cache_dir)


def test_label_errors_name_the_row_never_the_value(tmp_path, cache_dir):
    (tmp_path / "d.csv").write_text("text,label\nhello,1\nworld,SECRET-TOKEN-123\n")
    with pytest.raises(InputError, match="row 1 holds a str") as error:
        load_dataset_for(SEQUENCE_CLASSIFICATION, DataOptions(spec="d.csv"), tmp_path, cache_dir)
    assert "SECRET" not in str(error.value)


@pytest.mark.parametrize("split", ["train+test", "train[:90%]", "train[10:]", "../x", ""])
def test_splits_are_plain_names(split, cache_dir):
    with pytest.raises(InputError, match="invalid split"):
        load_dataset_for(SEQUENCE_CLASSIFICATION, DataOptions(spec="hf:some/data", split=split), None, cache_dir)


def test_unsupported_files_and_ids_are_clear_errors(tmp_path, cache_dir):
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(InputError, match="unsupported data file"):
        load_dataset_for(SEQUENCE_CLASSIFICATION, DataOptions(spec="d.parquet"), tmp_path, cache_dir)
    assert parse_hf_dataset_id("hf:glue@sst2") == ("glue", "sst2")
    with pytest.raises(InputError, match="invalid HF dataset ID"):
        parse_hf_dataset_id("hf:../x")
