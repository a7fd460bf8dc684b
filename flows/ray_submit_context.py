"""What the driver keeps between the task runs it submits to Ray: the serialized settings.

prefect-ray's `RayTaskRunner.submit` sends each task run the flow's context, serialized by
`prefect.context.serialize_context`, and ~95% of that is the settings context: a pydantic dump
of every Prefect setting, then two walks over the result (secrets, paths), ~30-50 ms of the
driver's CPU per task run (a `py-spy` profile of a 48-video run put a quarter of the driver's
CPU in `submit`, most of it there). The settings do not change while a flow submits its tasks,
so the runner serializes them once per settings context and, while `submit` runs, puts in
context a copy of that settings context that answers `serialize` with the kept dump. Every
other part of the context (flow run, tags, assets, deployment) is serialized per task run as
before. prefect-ray has no hook for this; the runner wraps its `submit` (flows/ray_runner.py).
The Ray worker's side is flows/ray_worker_context.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.context import SettingsContext
from pydantic import PrivateAttr


class _SerializedSettingsContext(SettingsContext):
    """A settings context (same profile, same settings) whose serialized form is given."""

    _serialized: dict[str, Any] = PrivateAttr(default_factory=dict)

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        if not include_secrets:  # never asked by serialize_context; no dump kept for it
            return super().serialize(include_secrets=False)
        return self._serialized


class SerializedSettings:
    """The settings context's dump, made once per settings context and reused while a runner
    submits: `with kept.in_context(): runner.submit(...)`."""

    def __init__(self) -> None:
        # The settings context last serialized, and its dump; replaced as one (two threads
        # that race here at most both serialize).
        self._kept: tuple[SettingsContext, dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled empty: a task run's context holds its flow, which holds this runner."""
        return {"_kept": None}

    def serialized(self, settings_context: SettingsContext) -> dict[str, Any]:
        """`settings_context.serialize()`, kept for the last settings context asked about."""
        kept = self._kept
        if kept is None or kept[0] is not settings_context:
            kept = (settings_context, settings_context.serialize())
            self._kept = kept
        return kept[1]

    @contextlib.contextmanager
    def in_context(self) -> Iterator[None]:
        """While it is open, the current settings context serializes to its kept dump."""
        current = SettingsContext.get()
        if current is None:  # Prefect's own settings are still loading: nothing to keep
            yield
            return
        stand_in = _SerializedSettingsContext.model_construct(
            profile=current.profile, settings=current.settings
        )
        stand_in._serialized = self.serialized(current)
        with stand_in:
            yield
