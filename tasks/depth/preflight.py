"""A depth run's settings refused before any work, in one list: the CLI runs it before it
starts Prefect and Ray, and the flow again, for the runs the CLI did not start (deployments)."""

from __future__ import annotations

from common.files import check_writable_folder
from tasks.depth.depth_model import check_depth_backend, check_depth_model
from tasks.depth.settings import DepthSettings


def check_run_settings(settings: DepthSettings) -> bool:
    """Refuse a backend and device pair, a depth model, or an output folder that cannot be
    written (the frames spec is the settings' own check); return whether the model is an
    untrained stand-in (random weights)."""
    check_depth_backend(settings.depth_backend, settings.device)
    untrained = check_depth_model(settings.depth_model, settings.depth_backend)
    check_writable_folder(settings.output.resolve())  # last: it makes the folder
    return untrained
