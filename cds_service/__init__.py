"""g2250-cds: a CDS Hooks 2.0 service for HCPCS G2250/G2010 store-and-forward remote assessments."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: importing a sub-package (rules, fhir) must not pull in Flask and the hook services.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
