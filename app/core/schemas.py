"""Request and response bodies of the API: one job request (`JobOptions` + the model), reused by the
registry's create and patch; the public views of jobs, layers, steps and registry runs."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from worker.engine.errors import InputError
from worker.engine.spec import parse_source

from .models import STATUSES
from .webhooks import check_target


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetIn(Strict):
    max_drop: float = Field(gt=0, lt=1, description="largest allowed metric drop, in (0, 1)")
    min_drop: float = Field(0.0, ge=0, lt=1, description="lower edge of the range: stop once a drop reaches it")
    mode: Literal["relative", "absolute"] = "relative"

    @model_validator(mode="after")
    def _ordered(self) -> "BudgetIn":
        if self.min_drop > self.max_drop:
            raise ValueError(f"min_drop ({self.min_drop}) must not exceed max_drop ({self.max_drop})")
        return self


class DataIn(Strict):
    spec: str | None = Field(None, description="HF dataset ID (hf:name[@config]) or a file under the model root")
    split: str = "train"
    text_column: str = "text"
    label_column: str | None = "label"
    image_column: str = "image"
    synthetic: bool = False


class JobOptions(Strict):
    """What a job is asked to do, besides which model: shared by jobs and registry entries."""

    budget: BudgetIn
    ordering: Literal["augmented", "hessian", "random"] = "augmented"
    selection: Literal["cost-aware", "sensitivity"] = Field(
        "cost-aware", description="order layers by accuracy cost per millisecond saved, or by sensitivity alone")
    interlayer: Literal["conditional", "pairwise"] = "conditional"
    batch_size: int = Field(8, ge=1, le=512)
    seq_len: int = Field(128, ge=1, le=8192)
    calibration_samples: int = Field(128, ge=1, le=100_000)
    eval_samples: int = Field(256, ge=1, le=100_000)
    test_samples: int = Field(256, ge=1, le=100_000, description="held out from every decision; scores the final plan")
    hutchinson_samples: int = Field(16, ge=2, le=1000)
    precisions: list[Literal["int8", "fp8"]] = Field(default_factory=lambda: ["int8"], min_length=1)
    priority: int = Field(5, ge=0, le=9)
    data: DataIn | None = None
    webhook_url: str | None = Field(None, max_length=2000, description="notified (HMAC-signed) when the job ends")

    @field_validator("webhook_url")
    @classmethod
    def _allowed_webhook(cls, value: str | None) -> str | None:
        return None if value is None else check_target(value)

    @field_validator("precisions")
    @classmethod
    def _one_low_precision(cls, value: list[str]) -> list[str]:
        if len(set(value)) != 1:
            raise ValueError("one low precision per job for now: ['int8'] on CPU, ['int8'] or ['fp8'] on GPU")
        return value


class JobCreate(JobOptions):
    model: str = Field(description="hf:<repo_id>[@revision], local:<dir> or builtin:<name>", max_length=300)

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
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
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


class ScheduleIn(Strict):
    cron: str | None = Field(None, description="5-field cron expression, UTC", max_length=100)
    interval_seconds: int | None = Field(None, ge=10, le=366 * 86400)

    @model_validator(mode="after")
    def _exactly_one(self) -> "ScheduleIn":
        from croniter import croniter

        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of cron or interval_seconds")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ValueError(f"invalid cron expression {self.cron!r}")
        return self

    def to_dict(self) -> dict:
        return {"cron": self.cron} if self.cron else {"interval_seconds": self.interval_seconds}


class RegistrySettings(Strict):
    """When a registry entry re-runs its job and when it raises a regression."""

    schedule: ScheduleIn
    regression_threshold: float = Field(0.01, gt=0, lt=1, description="reduction or relative metric drop that flags")
    paused: bool = False


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
    next_run_at: datetime
    webhook_url: str | None
    regression_threshold: float
    last_revision: str | None
    last_run_at: datetime | None
    created_at: datetime
    links: dict[str, str]


class RunOut(BaseModel):
    run_id: int
    fired_at: datetime
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
