"""Request and response bodies of the API: one job request (`JobOptions` + the model), reused by the
registry's create and patch; the public views of jobs, layers, steps and registry runs."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from worker.engine import sizing
from worker.engine.catalogue import BUILTIN_NAMES
from worker.engine.errors import InputError
from worker.engine.search import DEFAULT_CONFIDENCE
from worker.engine.plan import GGML_TYPES
from worker.engine.paths import HF_CONFIG_PATTERN, HF_REPO_PATTERN, HF_REVISION_PATTERN, SPLIT_PATTERN
from worker.engine.spec import parse_source

from .models import STATUSES, utcnow
from .settings import get_settings
from .webhooks import CONTROL_CHARACTERS, check_target

# The database keeps naive UTC; answers say so (RFC 3339 needs the offset, and browsers read a bare time as local).
UtcDateTime = Annotated[datetime, AfterValidator(lambda value: value.replace(tzinfo=value.tzinfo or timezone.utc))]

# The SOURCE and data grammars as patterns, so the schema says what the validators accept (the validators
# still check what a pattern cannot: '..' in Hub names, paths under the model root).
MODEL_PATTERN = (rf"^(builtin:({'|'.join(BUILTIN_NAMES)})|hf:{HF_REPO_PATTERN}(@{HF_REVISION_PATTERN})?"
                 r"|local:[^\x00]+|[^:\x00]+)$")
DATA_PATTERN = rf"^(hf:{HF_REPO_PATTERN}(@{HF_CONFIG_PATTERN})?|[^:\x00]+)$"
WEBHOOK_PATTERN = rf"^https?://[^\s{CONTROL_CHARACTERS}]+$"


def _valid_unicode(value) -> None:
    """JSON may carry lone surrogates (\\ud800) that no database or response can encode, and NUL characters
    (\\u0000) that PostgreSQL's text and JSON columns refuse: refuse both."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode: lone surrogates such as \\ud800 are refused") from None
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters (\\u0000)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key)
            _valid_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode(item)


class Strict(BaseModel):
    """A request body: unknown fields, NaN, infinities and invalid Unicode are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, values):
        _valid_unicode(values)
        return values


class BudgetIn(Strict):
    max_drop: float = Field(gt=0, lt=1, description="largest allowed metric drop, in (0, 1)")
    min_drop: float = Field(0.0, ge=0, lt=1, description="lower edge of the range: stop once a drop reaches it; "
                                                         "at most max_drop")
    mode: Literal["relative", "absolute"] = "relative"
    confidence: float = Field(DEFAULT_CONFIDENCE, ge=0.5, lt=1,
                              description="the one-sided level of each plan's test: a plan is accepted when its drop "
                                          "plus z standard errors (paired over the evaluation samples) is within "
                                          "max_drop; 0.5 accepts on the drop alone. It bounds one plan's expected "
                                          "drop, not the chance that the returned plan (the search picks among "
                                          "many) holds on new data: bench/confidence.py measures that coverage")

    @model_validator(mode="after")
    def _ordered(self) -> "BudgetIn":
        if self.min_drop > self.max_drop:
            raise ValueError(f"min_drop ({self.min_drop}) must not exceed max_drop ({self.max_drop})")
        return self


class DataIn(Strict):
    spec: str | None = Field(None, max_length=1000, pattern=DATA_PATTERN,
                             description="HF dataset ID (hf:name[@config]) or a file under the model root")
    split: str = Field("train", pattern=f"^{SPLIT_PATTERN}$", description="a split name such as train")
    text_column: str = Field("text", max_length=200)
    label_column: str | None = Field("label", max_length=200)
    image_column: str = Field("image", max_length=200)
    synthetic: bool = False


class JobOptions(Strict):
    """What a job is asked to do, besides which model: shared by jobs and registry entries."""

    budget: BudgetIn
    ordering: Literal["augmented", "hessian", "random"] = "augmented"
    selection: Literal["cost-aware", "sensitivity"] = Field(
        "cost-aware", description="order layers by accuracy cost per millisecond saved, or by sensitivity alone")
    interlayer: Literal["conditional", "pairwise"] = "conditional"
    analysis_loss: Literal["fidelity", "task"] = Field(
        "fidelity", description="what a labelled classifier's layers are scored on: KL to the float model's "
                                "predictions, or the cross-entropy with the labels (the budget is on the metric)")
    batch_size: int = Field(8, ge=1, le=512)
    seq_len: int = Field(128, ge=1, le=8192)
    calibration_samples: int = Field(128, ge=1, le=100_000)
    eval_samples: int = Field(256, ge=1, le=100_000)
    test_samples: int = Field(256, ge=1, le=100_000, description="held out from every decision; scores the final plan")
    hutchinson_samples: int = Field(16, ge=2, le=1000)
    precisions: list[Literal["int8", "fp8", "int8wo", "int4wo", "bf16", *GGML_TYPES]] | None = Field(
        None, min_length=1, max_length=len(GGML_TYPES),
        description="the low precisions a plan may use, chosen per layer: ['int8'] (or ['fp8'] on GPU workers); on "
                    "CPU, int8 with int8wo and int4wo (weight-only) and bf16 in any mix. Default: the worker's "
                    "measured menu: ['int8'] (int8, int8wo, int4wo for causal language models), plus bf16 for "
                    "Linear-only models where the worker's CPU runs bf16 faster than fp32. With runtime llama.cpp: "
                    "GGML types (" + ", ".join(GGML_TYPES) + "), by default all of them, of which the worker offers "
                    "those it measures faster")
    baseline: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the float execution a plan must beat on latency (accuracy is always against the model "
                            "as given, fp32): auto = the fastest float this worker runs natively (measured), or name "
                            "one. The report gives the reduction against fp32 and against this one")
    latency: Literal["decode", "prefill"] | None = Field(
        None, description="a causal language model's timed workload the search makes faster: one decoding step at "
                          "batch 1 (tokens/s; the default) or the prefill of a seq_len prompt (time to first token)")
    priority: int = Field(5, ge=0, le=9)
    exports: list[Literal["onnx"]] = Field(
        default_factory=lambda: ["onnx"], max_length=1,
        description="deployable formats besides the torch artifact, each verified in its own runtime")
    runtime: Literal["torch", "onnxruntime", "llama.cpp"] = Field(
        "torch", description="where every plan is evaluated, timed and delivered: torch's kernels, onnxruntime (the "
                             "artifact is its ONNX file) or llama.cpp (causal language models read from a GGUF file; "
                             "the artifact is a GGUF file with a GGML type per tensor)")
    data: DataIn | None = None
    webhook_url: str | None = Field(None, max_length=2000, pattern=WEBHOOK_PATTERN,
                                    description="notified (HMAC-signed per tenant) when the job ends")

    @model_validator(mode="after")
    def _precisions_of_the_runtime(self):
        ggml = [p for p in self.precisions or [] if p in GGML_TYPES]
        if self.runtime == "llama.cpp" and len(ggml) != len(self.precisions or []):
            raise ValueError(f"runtime llama.cpp takes GGML types as precisions ({', '.join(GGML_TYPES)})")
        if self.runtime != "llama.cpp" and ggml:
            raise ValueError(f"GGML types ({', '.join(ggml)}) are precisions of runtime llama.cpp")
        return self

    @field_validator("precisions")
    @classmethod
    def _one_family(cls, value: list[str] | None) -> list[str] | None:
        if value and "fp8" in value and len(value) > 1:
            raise ValueError("fp8 is a GPU precision of its own: ask for ['fp8'] alone")
        if value and len(set(value)) != len(value):
            raise ValueError("each precision at most once")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _allowed_webhook(cls, value: str | None) -> str | None:
        return None if value is None else check_target(value)


class JobCreate(JobOptions):
    # The pattern documents the grammar; parse_source enforces it, with a message that says what is wrong.
    model: str = Field(description="hf:<repo_id>[@revision], local:<dir> or builtin:<name>", max_length=300,
                       json_schema_extra={"pattern": MODEL_PATTERN})

    @model_validator(mode="before")
    @classmethod
    def _no_remote_code(cls, values):
        if isinstance(values, dict) and "trust_remote_code" in values:
            raise ValueError("trust_remote_code is not accepted: mixq never runs code shipped with a model")
        return values

    @field_validator("model")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        try:
            return str(parse_source(value))
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _bounded(self) -> "JobCreate":
        """The product of the sample counts is capped, not only each count (sizing.py)."""
        settings = get_settings()
        try:
            sizing.check(self.model_dump(), settings.max_job_memory_bytes, settings.max_job_sample_passes)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self


def partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional for a PATCH: an absent field is left as it is, a present one is
    validated as declared (so null only where the field itself is nullable)."""
    fields = {field: (info.annotation, FieldInfo.merge_field_infos(info, default=None, default_factory=None))
              for field, info in model.model_fields.items()}
    return create_model(name, __base__=model, **fields)


class JobOut(BaseModel):
    id: str
    model: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    finished: bool = Field(description="the status is final: succeeded, failed or cancelled")
    phase: str | None
    progress: float
    step: int | None
    steps: int | None
    message: str | None
    error: str | None
    request: dict
    phases: dict
    attempts: int
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    result_status: str | None
    baseline_metric: float | None
    final_metric: float | None
    latency_reduction: float | None
    cancel_requested: bool
    links: dict[str, str]


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class LayerOut(BaseModel):
    position: int
    name: str
    kind: str
    params: int
    output_error: float | None = None
    hessian_trace: float | None
    trace_stderr: float | None
    hessian_term: float | None
    interlayer: float | None
    score: float | None
    rank: int
    precision: str
    latency_saving_ms: float | None = Field(None, description="measured on the real kernels; see search.latency_model")
    saving_noise_ms: float | None = None
    excluded: str | None = Field(None, description="why the layer was kept in float whatever its sensitivity")


class StepOut(BaseModel):
    position: int
    k: int
    metric: float
    drop: float
    latency_ms: float | None
    predicted_latency_ms: float | None = None
    accepted: bool
    chosen: bool
    stage: str = "bisection"
    skipped: list[str] = []


CRON_GAPS_CHECKED = 64  # consecutive firings of a cron whose closest pair must respect the floor


class CronSchedule(Strict):
    cron: str = Field(description="5-field cron expression, UTC", max_length=100,
                      json_schema_extra={"pattern": r"^\S+( \S+){4}$"})  # _fires says what is wrong, field by field

    @field_validator("cron")
    @classmethod
    def _fires(cls, value: str) -> str:
        from croniter import CroniterError, croniter

        if len(value.split()) != 5:  # croniter also takes seconds and years, whose last slot ends a schedule
            raise ValueError(f"invalid cron expression {value!r}: give exactly 5 fields (minute hour day month "
                             "weekday)")
        if not croniter.is_valid(value):
            raise ValueError(f"invalid cron expression {value!r}")
        try:
            firings = croniter(value, utcnow())
            times = [firings.get_next(datetime) for _ in range(CRON_GAPS_CHECKED + 1)]
        except CroniterError:  # e.g. 0 0 30 2 *: valid fields, but February has no 30th
            raise ValueError(f"cron expression {value!r} never fires") from None
        # The operator's floor holds for a cron as for an interval: its closest firings (over the next few, which
        # covers every minute- and hour-field pattern) may not be nearer than MIXQ_MIN_INTERVAL_SECONDS.
        gap = min((later - earlier).total_seconds() for earlier, later in zip(times, times[1:]))
        floor = get_settings().min_interval_seconds
        if gap < floor:
            raise ValueError(f"cron expression {value!r} fires {gap:g} s apart, more often than the floor of {floor} s "
                             "(MIXQ_MIN_INTERVAL_SECONDS): a job takes minutes, and a schedule must not outrun it")
        return value

    def to_dict(self) -> dict:
        return {"cron": self.cron}


class IntervalSchedule(Strict):
    interval_seconds: int = Field(ge=10, le=366 * 86400,
                                  description="at least the operator's floor, MIXQ_MIN_INTERVAL_SECONDS (300 by default)")

    @field_validator("interval_seconds")
    @classmethod
    def _not_too_often(cls, value: int) -> int:
        floor = get_settings().min_interval_seconds
        if value < floor:
            raise ValueError(f"interval_seconds must be at least {floor} (MIXQ_MIN_INTERVAL_SECONDS): a job takes "
                             "minutes, and a schedule must not outrun it")
        return value

    def to_dict(self) -> dict:
        return {"interval_seconds": self.interval_seconds}


def _schedule_kind(value) -> str | None:
    if isinstance(value, dict):
        return "cron" if "cron" in value else "interval"
    return {CronSchedule: "cron", IntervalSchedule: "interval"}.get(type(value))


# Tagged by the key given, so a bad cron expression is reported once, not also as an unknown interval key.
Schedule = Annotated[Annotated[CronSchedule, Tag("cron")] | Annotated[IntervalSchedule, Tag("interval")],
                     Discriminator(_schedule_kind)]


class RegistrySettings(Strict):
    """When a registry entry re-runs its job and when it raises a regression."""

    schedule: Schedule = Field(description="exactly one of cron or interval_seconds")
    regression_threshold: float = Field(0.01, gt=0, lt=1, description="reduction or relative metric drop that flags")
    paused: bool = False

    @field_validator("schedule", mode="before")
    @classmethod
    def _one_kind(cls, value):
        if isinstance(value, dict) and ("cron" in value) == ("interval_seconds" in value):
            raise ValueError("give exactly one of cron or interval_seconds")
        return value


class RegistryCreate(JobCreate, RegistrySettings):
    """A job request plus when to re-run it and when to raise a regression."""

    def job_request(self) -> dict:
        return self.model_dump(mode="json", exclude=set(RegistrySettings.model_fields) | {"webhook_url"})


class RegistryUpdate(JobOptions, RegistrySettings):
    pass


RegistryPatch = partial(RegistryUpdate, "RegistryPatch")


class RegistryOut(BaseModel):
    id: str
    model: str
    request: dict
    schedule: dict
    paused: bool
    next_run_at: UtcDateTime
    webhook_url: str | None
    regression_threshold: float
    last_revision: str | None
    last_run_at: UtcDateTime | None
    created_at: UtcDateTime
    links: dict[str, str]


class RegistryList(BaseModel):
    entries: list[RegistryOut]
    next_cursor: str | None


class RunOut(BaseModel):
    run_id: int
    fired_at: UtcDateTime
    trigger: str
    revision: str | None
    outcome: str
    reason: str | None
    job_id: str | None
    job_status: str | None
    final_metric: float | None
    latency_ms: float | None
    latency_reduction: float | None
    delta_metric: float | None
    delta_reduction: float | None
    regression: bool


class RunList(BaseModel):
    runs: list[RunOut]
    next_cursor: int | None


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="this tenant's signing key; every other tenant has its own")
    header: str
    scheme: str
    replay_window_seconds: int
