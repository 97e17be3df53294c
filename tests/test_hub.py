"""`hf:` sources and datasets through the real huggingface_hub code, against a Hub on 127.0.0.1
(tests/hubserver.py): the Hub only, pinned to a commit, only loadable files, clear errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.core import registry
from app.core.db import session_scope
from app.core.models import Job, RegistryRun
from conftest import SMALL_JOB, auth, save_tiny_bert, tiny_resnet
from test_registry import at, register
from worker import runner
from worker.engine import hub as hub_client
from worker.engine.data import DataOptions
from worker.engine.errors import InputError
from worker.engine.sources import load_model
from worker.engine.spec import parse_source, resolve_revision

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = DataOptions(spec="hf:mixq-test/sentences", calibration_samples=8, eval_samples=16, test_samples=16,
                        seq_len=16)


def test_an_hf_model_and_dataset_load_from_a_pinned_snapshot(hub, tmp_path):
    main = hub.repos["mixq-test/tiny-bert"].refs["main"]
    loaded = load_model(parse_source("hf:mixq-test/tiny-bert"), SENTENCES, None, tmp_path)
    assert loaded.revision == main and loaded.task == "sequence-classification"
    assert loaded.data.labelled and loaded.data.description.startswith("hf:mixq-test/sentences@")
    snapshot = tmp_path / "hub" / "models--mixq-test--tiny-bert" / "snapshots" / main
    fetched = {p.name for p in snapshot.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert not fetched & {"pytorch_model.bin", "modeling_evil.py"}  # no pickles, no code
    # Pinned: every file came from the commit main named when the job resolved it.
    downloads = [r for r in hub.requests if "/resolve/" in r and "tiny-bert" in r]
    assert downloads and all(f"/resolve/{main}/" in r for r in downloads)


def test_revisions_by_sha_and_branch_and_a_moving_main(hub, tmp_path):
    first = hub.repos["mixq-test/tiny-bert"].refs["main"]
    assert resolve_revision(parse_source("hf:mixq-test/tiny-bert@main"), None) == first
    assert resolve_revision(parse_source(f"hf:mixq-test/tiny-bert@{first}"), None) == first
    moved = tmp_path / "v2"
    save_tiny_bert(moved)
    (moved / "README.md").write_text("retrained")
    second = hub.push("mixq-test/moving", moved)
    assert resolve_revision(parse_source("hf:mixq-test/moving"), None) == second
    third = hub.push("mixq-test/moving", moved)
    assert resolve_revision(parse_source("hf:mixq-test/moving"), None) == third
    assert resolve_revision(parse_source(f"hf:mixq-test/moving@{second}"), None) == second  # old commits stay


@pytest.mark.parametrize("source, message", [
    ("hf:mixq-test/no-such-model", "model 'mixq-test/no-such-model' was not found on the Hub"),
    ("hf:mixq-test/tiny-bert@no-such-branch", "revision 'no-such-branch' of model 'mixq-test/tiny-bert' does not exist"),
])
def test_unknown_repositories_and_revisions_are_clear_errors(hub, tmp_path, source, message):
    with pytest.raises(InputError, match=message):
        load_model(parse_source(source), SENTENCES, None, tmp_path)


def test_hf_names_never_read_a_local_folder_of_that_name(hub, tmp_path, monkeypatch):
    """`./leak/` next to the worker: transformers and datasets would both read it for the bare name."""
    monkeypatch.chdir(tmp_path)
    save_tiny_bert(tmp_path / "leak")
    (tmp_path / "leak" / "train.csv").write_text("text,label\nhello,SECRET-VALUE-42\n")
    with pytest.raises(InputError, match="model 'leak' was not found on the Hub") as error:
        load_model(parse_source("hf:leak"), DataOptions(synthetic=True), None, tmp_path / "cache")
    with pytest.raises(InputError, match="dataset 'leak' was not found on the Hub") as data_error:
        load_model(parse_source("hf:mixq-test/tiny-bert"), DataOptions(spec="hf:leak"), None, tmp_path / "cache")
    assert "SECRET" not in str(error.value) + str(data_error.value)


def test_a_hanging_hub_times_out_with_a_reason(hub):
    hub.delay = 10.0
    try:
        started = time.monotonic()
        with pytest.raises(InputError, match="cannot reach the Hub .*timeout 0.5 s"):
            hub_client.resolve("mixq-test/tiny-bert", None, timeout=0.5)
        assert time.monotonic() - started < 8  # the Hub would answer after 10 s
    finally:
        hub.delay = 0.0


def test_an_hf_job_runs_end_to_end_and_an_unknown_one_fails_with_the_reason(client, keys, hub):
    body = {"model": "hf:mixq-test/tiny-bert", "budget": {"max_drop": 0.05}, **SMALL_JOB, "seq_len": 16,
            "data": {"spec": "hf:mixq-test/sentences"}, "calibration_samples": 8, "eval_samples": 16,
            "test_samples": 16}
    good = client.post("/v1/jobs", json=body, headers=auth(keys["a"])).json()["id"]
    bad = client.post("/v1/jobs", json={**body, "model": "hf:mixq-test/gone"}, headers=auth(keys["a"])).json()["id"]
    outcome = runner.run(good, worker="t")
    with session_scope() as session:
        print("ERR", session.get(Job, good).error)
    assert outcome == "succeeded"
    assert runner.run(bad, worker="t") == "failed"
    with session_scope() as session:
        done, failed = session.get(Job, good), session.get(Job, bad)
        assert done.revision == hub.repos["mixq-test/tiny-bert"].refs["main"]
        assert done.report["revision"] == done.revision
        assert failed.error == "model 'mixq-test/gone' was not found on the Hub (or is private or gated)"


def test_a_registry_entry_notices_main_moving(client, keys, hub, tmp_path):
    folder = tmp_path / "model"
    save_tiny_bert(folder)
    first = hub.push("mixq-test/watched", folder)
    entry = register(client, keys["a"], model="hf:mixq-test/watched", data={"spec": "hf:mixq-test/sentences"})
    registry.tick(at(entry))
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                     "mixq_note": "retrained"}))
    second = hub.push("mixq-test/watched", folder)
    registry.tick(at(entry, 3600))
    with session_scope() as session:
        fired = list(session.scalars(select(RegistryRun).where(RegistryRun.entry_id == entry["id"])
                                     .order_by(RegistryRun.id)))
        assert [(r.outcome, r.reason, r.revision) for r in fired] == [
            ("enqueued", "first run", first), ("enqueued", "new revision", second)]


def test_a_model_saved_without_processor_runs_on_arrays_and_says_what_is_missing_for_images(tmp_path, cache_dir):
    """save_pretrained alone: config and safetensors, no preprocessor_config.json."""
    model = tiny_resnet()
    model.config.architectures = ["ResNetForImageClassification"]
    model.save_pretrained(tmp_path / "resnet")
    np.savez(tmp_path / "pixels.npz", pixel_values=np.random.rand(24, 1, 16, 16).astype("float32"),
             labels=np.arange(24) % 4)
    loaded = load_model(parse_source("local:resnet"), DataOptions(spec="pixels.npz", calibration_samples=8,
                                                                  eval_samples=8, test_samples=8), tmp_path, cache_dir)
    assert loaded.data.labelled and loaded.task == "image-classification"

    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "images" / label / f"{i}.png")
    env = {**os.environ, "MIXQ_MODEL_ROOT": str(tmp_path)}
    cli = subprocess.run([sys.executable, "-m", "app.cli", "compress", "local:resnet", "--data", "images",
                          "--budget", "0.05"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr
    assert "has no image processor (preprocessor_config.json)" in cli.stderr and "Traceback" not in cli.stderr
