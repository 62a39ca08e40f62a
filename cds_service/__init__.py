"""g2250-cds: a CDS Hooks 2.0 service for HCPCS G2250/G2010 store-and-forward remote assessments."""

__version__ = "0.1.0"

from .app import create_app

__all__ = ["__version__", "create_app"]
