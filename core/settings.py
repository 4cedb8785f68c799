"""One settings object: ``config/<profile>.yaml``, then ``FLYWHEEL_*`` variables, then CLI.

``get_settings()`` is cached; entry points call ``configure(...)`` with CLI overrides before
anything reads settings.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"


class DaskSettings(BaseModel):
    """Where Dask work runs."""

    address: str | None = Field(
        None, description="Scheduler address (tcp://host:8786). Empty means a local cluster."
    )
    processes: bool = Field(
        False,
        description="Local cluster only: worker processes instead of threads in this process.",
    )
    n_workers: int = Field(1, ge=1, description="Local cluster only: number of workers.")
    threads_per_worker: int | None = Field(
        None, ge=1, description="Local cluster only: threads per worker (default: all cores)."
    )
    dashboard_address: str | None = Field(
        None, description="Local cluster only: e.g. '127.0.0.1:8787'; empty disables it."
    )
    partition_rows: int = Field(
        500_000, ge=1_000, description="Target rows per Dask partition when reading the lake."
    )

    @model_validator(mode="after")
    def _no_conflicts(self) -> DaskSettings:
        if self.address and (self.processes or self.n_workers != 1 or self.threads_per_worker):
            raise ValueError(
                "dask.address names a remote scheduler; local-cluster options "
                "(processes, n_workers, threads_per_worker) cannot be combined with it"
            )
        return self


class RaySettings(BaseModel):
    """Where Ray work runs."""

    address: str | None = Field(
        None, description="Ray cluster address (host:6379 or ray://host:10001). Empty: local."
    )
    num_cpus: int | None = Field(None, ge=1, description="Local only: CPUs Ray may use.")
    object_store_memory: int = Field(
        512 * 1024**2, ge=78 * 1024**2, description="Local only: object store bytes."
    )
    dashboard_host: str = Field("127.0.0.1", description="Local only: dashboard bind address.")
    include_dashboard: bool = Field(False, description="Local only: start Ray's dashboard.")
    storage_path: str | None = Field(
        None, description="Ray Tune's trial results and checkpoints: a folder every Ray node and the driver see "
        "(on a cluster: a shared file system such as NFS or EFS). Default: <home>/ray.")

    @model_validator(mode="after")
    def _no_conflicts(self) -> RaySettings:
        if self.address and self.num_cpus is not None:
            raise ValueError("ray.address names a cluster; ray.num_cpus applies to a local Ray only")
        return self


class SearchSpace(BaseModel):
    """Ray Tune search space for the tabular network."""

    lr: tuple[float, float] = Field((1e-3, 3e-3), description="Learning rate range (log-uniform).")
    width: list[int] = Field([64, 128], description="Hidden layer widths to try.")
    depth: list[int] = Field([2], description="Numbers of hidden layers to try.")
    dropout: list[float] = Field([0.0, 0.1], description="Dropout rates to try.")
    embedding_dim: list[int] = Field([4, 8], description="Largest embedding size to try.")
    batch_size: list[int] = Field([1024], description="Batch sizes to try (per worker).")
    weight_decay: tuple[float, float] = Field((1e-6, 1e-4), description="Weight decay range (log-uniform).")


class FamilySettings(BaseModel):
    """One model family in the competition (``train.families``)."""

    model_config = ConfigDict(extra="forbid")

    family: str = Field(description="A built-in family (linear, gbdt, tabular_net) or a dotted path to a "
                        "core.families.ModelFamily subclass (my_package.models:MyFamily).")
    trials: int | None = Field(None, ge=0, description="Trials for this family (default: train.trials, or "
                               "fewer where the family needs fewer, e.g. linear: 1).")
    space: dict[str, Any] | None = Field(None, description="Its search space: a list is a choice, "
                                         "{loguniform: [lo, hi]}, {uniform: [lo, hi]} or {randint: [lo, hi]} "
                                         "a range, a scalar fixed. Default: the family's own (tabular_net: "
                                         "train.search_space).")


def _default_families() -> list[FamilySettings]:
    # Preference on a near tie: the linear model, then the network (both extrapolate a trend
    # into a season the training period did not cover), then trees (which hold their last value).
    return [FamilySettings(family=name) for name in ("linear", "tabular_net", "gbdt")]


class TrainSettings(BaseModel):
    """Training, tuning, tracking and registration."""

    families: list[FamilySettings] = Field(
        default_factory=_default_families, description="The model families that compete in each train "
        "run, in order of preference on a tie: built-in names or dotted paths, each with optional trials "
        "and search space.")

    @field_validator("families", mode="before")
    @classmethod
    def _names_are_families(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [{"family": v} if isinstance(v, str) else v for v in value]
        return value

    model_name: str = Field("flywheel-{dataset}", description="Registered model name template.")
    trials: int = Field(4, ge=1, description="Ray Tune trials.")
    max_epochs: int = Field(5, ge=1, description="Most epochs a trial may run (ASHA max_t).")
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before ASHA may stop it.")
    num_workers: int = Field(
        1, ge=1, description="Workers per trial: 1 trains in the trial's own reused process; 2 or "
        "more fit a Ray Train DDP worker group per trial.")
    max_failures: int = Field(2, ge=0, description="Worker failures a fit survives (resuming).")
    seed: int = Field(13, description="Seed for sampling, initialisation, shuffling and dropout.")
    selection_tolerance: float = Field(
        0.002, ge=0, description="The competition's winner is the best validation loss, except that a family "
        "listed earlier in train.families wins when its best is within this fraction of it (a near tie is "
        "noise; the simpler model is the better bet).")
    register_margin: float = Field(
        0.002, ge=0, description="How much the model must beat each baseline by (ROC AUC points "
        "for classification, relative RMSE for regression)."
    )
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI. Default: sqlite:///<home>/mlflow.db"
    )


class ServingSettings(BaseModel):
    """The BentoML service: where it listens, how it splits traffic, batches and logs."""

    dataset: str = Field("flights", description="Dataset contract whose registered model is served.")
    model_name: str | None = Field(None, description="Registered model (default: train.model_name for the dataset).")
    host: str = Field("127.0.0.1", description="Bind address (loopback unless you mean otherwise).")
    port: int = Field(3000, ge=1, le=65535, description="HTTP port.")
    workers: int = Field(2, ge=1, le=64, description="BentoML worker processes (each scores on its own core; each "
                         "follows the registry's aliases by itself, within alias_poll_s).")
    challenger_share: float = Field(
        0.1, ge=0, le=1, description="Share of routing keys sent to the challenger, when there is one (sticky A/B), "
        "unless a rollout or the bandit set another for it (the registered model's tag flywheel.allocation).")
    allocation: Literal["fixed", "thompson"] = Field(
        "fixed", description="fixed: challenger_share (or a rollout's step); thompson: the evaluate flow sets the "
        "challenger's share to the posterior probability that it earns the higher ground-truth reward.")
    allocation_floor: float = Field(0.05, ge=0, le=0.5, description="thompson: the least share either arm keeps.")
    shadow: bool = Field(False, description="The challenger also scores champion traffic; logged, never returned, "
                         "and no response waits for it.")
    routing_field: str | None = Field(
        None, description="Record field that keys sticky routing (e.g. tailnum); a request's routing_key "
        "wins; with neither, a random key.")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Classification: decision threshold on the probability (default: the one "
        "each model version recorded, chosen on validation at training; 0.5 if it has none).")
    max_records: int = Field(1000, ge=1, description="Most records in one /predict request.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (413 above).")
    max_batch_size: int = Field(256, ge=1, description="Most records one model call scores (adaptive batching).")
    max_concurrency: int = Field(256, ge=1, description="Requests in flight before the service answers 429 at once "
                                 "(overload: retry later). 503 means not ready: no models loaded.")
    ready_wait_s: float = Field(
        20.0, ge=0, description="A request arriving while the models load (a restarted worker) waits up to this "
        "long for them before a 503 (none when loading failed for good).")
    drain_s: float = Field(
        2.0, ge=0, description="On stop: how long the service keeps answering, /readyz failing (so a balancer "
        "stops sending) and every response closing its connection, before it stops taking connections; "
        "every request taken is then answered and logged.")
    lookup_refresh_s: float = Field(60.0, gt=0, description="How often lookup tables are checked for a new version.")
    alias_poll_s: float = Field(2.0, gt=0, description="How often the service reads the registry's aliases: a "
                                "promotion or rollback made anywhere (the MLflow UI too) is served within this.")
    log_flush_rows: int = Field(2000, ge=1, description="Prediction log: rows per Delta commit (at most).")
    log_flush_s: float = Field(5.0, gt=0, description="Prediction log: longest a row waits before a commit (each "
                               "row is in the worker's journal at once). Each commit is a Delta version and a "
                               "stall of the worker's requests: at 1 s the c=16 p99 was ~10 ms higher.")
    log_journal: Path | None = Field(
        None, description="Prediction log: local directory of the journal every answered prediction is written "
        "to before its response (default <home>/serving/journal/<dataset>); a killed worker's rows are "
        "committed from it by the next start.")
    log_fsync: bool = Field(False, description="Prediction log: fsync the journal on each request (survives a "
                            "machine crash; without it, any process kill, and the device gets it every flush).")
    feedback_memory: int = Field(
        200_000, ge=0, description="Recent request ids kept in memory for /feedback (older: read from the log).")


class MonitorSettings(BaseModel):
    """Drift and live-performance monitoring (flows.monitor)."""

    method: Literal["psi", "evidently"] = Field("psi", description="Drift scorer deciding per column.")
    psi: float = Field(0.2, gt=0, description="psi: a column drifts at PSI >= this.")
    drift_share: float = Field(0.3, gt=0, le=1, description="Data drift when this share of columns drifts.")
    window_rows: int = Field(20_000, ge=1, description="Latest served predictions judged per run.")
    min_rows: int = Field(500, ge=1, description="A smaller live window decides nothing.")
    reference_rows: int = Field(100_000, ge=1, description="Rows sampled from the champion's training data.")
    sample_rows: int = Field(50_000, ge=1, description="evidently: rows per side at most.")
    cooldown_s: float = Field(900.0, ge=0, description="At most one drift (or performance) event per this long.")
    performance_tolerance: float = Field(
        0.02, ge=0, description="Degraded when the live metric is worse than at registration by more than this "
        "(ROC AUC points; relative for RMSE).")
    min_feedback: int = Field(200, ge=1, description="Predictions with ground truth needed to judge performance.")
    pushgateway: str | None = Field(None, description="Prometheus Pushgateway address (host:port); empty: no push.")
    prometheus_url: str | None = Field(
        None, description="The Prometheus server (http://host:9090) that scrapes the services: a rollout's analysis "
        "reads its windows there, summed over every instance. Empty: from the service's own /metrics.")
    evidently_url: str | None = Field(
        None, description="An Evidently UI service (http://host:8000) that keeps the monitoring runs. Empty: a "
        "local workspace under <shared_root>/evidently, or none when shared_root is an object store.")


class Settings(BaseSettings):
    """Flywheel settings. Environment variables use the ``FLYWHEEL_`` prefix and ``__`` nesting
    (``FLYWHEEL_DASK__ADDRESS=tcp://...``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="forbid"
    )

    profile: str = Field("local", description="Settings profile: config/<profile>.yaml.")
    home: Path = Field(
        REPO_ROOT / ".flywheel", description="Local state: lake, MLflow, reports, caches."
    )
    lake_root: str | None = Field(
        None, description="Delta lake root: a folder or s3://bucket/prefix. Default: <home>/lake."
    )
    shared_root: str | None = Field(
        None, description="What other machines must see besides the lake: monitoring reports and state, parked "
        "batches, Data Docs. A folder or s3://bucket/prefix. Default: <home>.")
    datasets_dir: Path = Field(CONFIG_DIR / "datasets", description="Where contracts live.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Object-store options for deltalake (s3 etc)."
    )
    dask: DaskSettings = Field(default_factory=DaskSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of Flywheel's own log lines in flow run logs.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence, highest first: CLI (init) > environment > profile YAML.
        return (init_settings, env_settings, _ProfileYamlSource(settings_cls))

    @property
    def lake(self) -> str:
        """The lake root as a string path or URL."""
        return self.lake_root or str(self.home / "lake")

    @property
    def shared(self) -> str:
        """The shared root as a string path or URL (``core.storage`` reads and writes it)."""
        return self.shared_root or str(self.home)

    @property
    def ray_storage(self) -> str:
        return self.ray.storage_path or str(self.home / "ray")

    @property
    def tracking_uri(self) -> str:
        return self.train.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return str(self.home / "mlartifacts")

    def ensure_home(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home


class _ProfileYamlSource(PydanticBaseSettingsSource):
    """Reads ``config/<profile>.yaml``; the profile comes from ``FLYWHEEL_PROFILE``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        profile = os.environ.get("FLYWHEEL_PROFILE", "local")
        path = CONFIG_DIR / f"{profile}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ValueError(f"settings profile {profile!r} not found at {path}; known: {known}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        data.setdefault("profile", profile)
        return data


_overrides: dict[str, Any] = {}


def configure(**overrides: Any) -> Settings:
    """Set CLI-level overrides (None values are ignored) and rebuild the cached settings."""
    if overrides.get("profile"):
        os.environ["FLYWHEEL_PROFILE"] = overrides["profile"]
    _overrides.clear()
    _overrides.update({k: v for k, v in overrides.items() if v is not None})
    get_settings.cache_clear()
    return get_settings()


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached)."""
    return Settings(**_overrides)
