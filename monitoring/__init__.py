"""Drift and performance monitoring, Prometheus metrics and alerts, dashboards."""
