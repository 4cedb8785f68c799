"""The service's Prometheus metrics (through BentoML's metrics client, so every worker's
values reach ``/metrics``). Names follow Prometheus conventions: ``_total`` counters,
``_seconds`` durations, labelled by variant and model version."""

from __future__ import annotations

from typing import Any

import bentoml

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = tuple(i / 10 for i in range(1, 10))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ERROR_KINDS = ("not_ready", "unscorable", "shadow", "unknown_request_id")


class Metrics:
    def __init__(self) -> None:
        m = bentoml.metrics
        self.requests = m.Counter(name="flywheel_requests_total", documentation="HTTP requests handled",
                                  labelnames=["endpoint"])
        self.predictions = m.Counter(name="flywheel_predictions_total", documentation="Records scored and returned",
                                     labelnames=["variant", "model_version"])
        self.errors = m.Counter(name="flywheel_errors_total", documentation="Errors by kind",
                                labelnames=["kind"])
        self.variant_errors = m.Counter(
            name="flywheel_variant_errors_total", labelnames=["variant", "model_version"],
            documentation="Records a model failed to score (a challenger's are answered by the champion)")
        self.latency = m.Histogram(name="flywheel_prediction_latency_seconds",
                                   documentation="Time to score a record (request start to result, per record)",
                                   labelnames=["variant", "model_version"], buckets=LATENCY_BUCKETS)
        self.scores = m.Histogram(name="flywheel_prediction_score", documentation="Distribution of scores returned",
                                  labelnames=["variant", "model_version"], buckets=SCORE_BUCKETS)
        self.batch_size = m.Histogram(name="flywheel_batch_size", documentation="Records per model call",
                                      buckets=BATCH_BUCKETS)
        self.feedback = m.Counter(name="flywheel_feedback_total", documentation="Ground-truth rows accepted")
        self.shadow = m.Counter(name="flywheel_shadow_predictions_total",
                                documentation="Records scored in shadow by the challenger (logged only)",
                                labelnames=["model_version"])
        self.log_failures = m.Counter(name="flywheel_log_write_failures_total",
                                      documentation="Failed prediction-log commits (rows kept and retried)",
                                      labelnames=["table"])
        self.log_backlog = m.Gauge(name="flywheel_log_backlog_rows", documentation="Log rows waiting for a commit",
                                   multiprocess_mode="livesum")
        self.lookup_reloads = m.Counter(name="flywheel_lookup_reloads_total",
                                        documentation="Lookup tables reloaded after a new lake version")
        self.model_info = m.Gauge(name="flywheel_model_info", documentation="1 for each model being served",
                                  labelnames=["variant", "model_name", "model_version"], multiprocess_mode="livemax")

        # Label sets known in advance start at zero, so "no failures" reads 0, not "no data".
        for table in ("predictions", "feedback"):
            self.log_failures.labels(table=table)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)

    def observe(self, variant: str, version: str, score: float, latency_s: float) -> None:
        self.predictions.labels(variant=variant, model_version=version).inc()
        self.latency.labels(variant=variant, model_version=version).observe(latency_s)
        self.scores.labels(variant=variant, model_version=version).observe(score)

    def set_models(self, deployed: Any) -> None:
        self.model_info.clear()
        for variant in ("champion", "challenger"):
            model = getattr(deployed, variant)
            if model is not None:
                self.model_info.labels(variant=variant, model_name=model.name, model_version=model.version).set(1)
