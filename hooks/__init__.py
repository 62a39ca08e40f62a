"""Hook services: one per CDS Hooks hook, on a shared template (see ``hooks.base``)."""

from .base import HookOutcome, HookRequest, HookService
from .services import SERVICES, SERVICES_BY_ID

__all__ = ["SERVICES", "SERVICES_BY_ID", "HookOutcome", "HookRequest", "HookService"]
