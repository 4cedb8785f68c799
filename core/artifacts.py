"""Names of what runs publish."""

from __future__ import annotations


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from names."""
    return "-".join("".join(c if c.isalnum() else "-" for c in part.lower()) for part in parts)
