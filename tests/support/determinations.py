"""Read what the rules judged during a hook call, even when the hook shows no card (patient-view is silent on
"not billable"): every call of the one judging function the hook services use is recorded."""

from __future__ import annotations

from typing import Any

import pytest

import hooks.services
from cds_service.rules.model import Determination


class Recorder:
    """Every determination the hook services computed since the last :meth:`take`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[Determination] = []
        original = hooks.services.determine

        def recording(*args: Any, **kwargs: Any) -> Determination:
            result = original(*args, **kwargs)
            self.seen.append(result)
            return result

        monkeypatch.setattr(hooks.services, "determine", recording)

    def take(self) -> list[Determination]:
        found, self.seen = self.seen, []
        return found
