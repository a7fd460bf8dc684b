"""The settings that shape a depth dataset's rows, recorded in its folder by its first run.

A later run into the folder skips videos that are done and reuses transcodes, so one with
another height, frames spec or model added nothing new for those videos and said nothing: a
dataset of 360p first-frame maps stayed one, labelled as the user's new settings. Such a run is
refused now, naming what differs; the same settings (or a new folder) go on as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.files import atomic_output
from tasks.depth.output_layout import OutputLayout
from tasks.depth.settings import DepthSettings

FILE_NAME = "vidflow-dataset.json"
# What a finished row depends on: its transcode and its depth maps.
TRANSCODE_SHAPING = ("height", "x264_preset", "x264_crf")
DEPTH_SHAPING = ("frames", "depth_model")
SHAPING = TRANSCODE_SHAPING + DEPTH_SHAPING


class DatasetSettingsError(ValueError):
    """The output folder holds a dataset made with other settings."""


def shaping_settings(settings: DepthSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in SHAPING}


def check_dataset_settings(folder: Path, settings: DepthSettings) -> None:
    """Raise DatasetSettingsError if `folder`'s dataset was made with other shaping settings
    (a folder without the record, new or of an older vidflow, takes any; so does one where
    nothing was made yet, e.g. after a run whose every transcode failed on a bad setting; the
    transcode settings bind once a transcode or a map is there, the depth settings once a map
    is, both once a row says a video is done)."""
    from tasks.depth.video_table import VideoTable  # Lance: only where a folder is checked

    recorded = _recorded(folder)
    wanted = shaping_settings(settings)
    transcodes, depth_maps = OutputLayout(folder).shaped_folders
    # Only what was made binds: after a run whose every depth call failed (a model that
    # would not load), another model goes on from the transcodes, not from a new folder.
    # A depth map binds the transcode's settings too: it lies on that transcode's frames (its
    # transcodes deleted to free space, a run at another height mixed two sizes of map).
    # So does a done row, its files deleted (to redo the dataset at other settings: its done
    # videos were skipped, and the record took the new settings; found in review, stop 62).
    maps_made = _holds_files(depth_maps) or VideoTable(folder).has_done_rows()
    binding = [
        *(TRANSCODE_SHAPING if maps_made or _holds_files(transcodes) else ()),
        *(DEPTH_SHAPING if maps_made else ()),
    ]
    differ = {name: recorded[name] for name in binding if name in recorded}
    differ = {name: value for name, value in differ.items() if value != wanted[name]}
    if differ:
        made = ", ".join(f"{name}={value}" for name, value in differ.items())
        asked = ", ".join(f"{name}={wanted[name]}" for name in differ)
        raise DatasetSettingsError(
            f"{folder} holds a dataset made with {made}; this run asks {asked}. Its done videos "
            "would be kept as they are: give this run another output folder, or the same "
            f"settings ({folder / FILE_NAME})"
        )


def record_dataset_settings(folder: Path, settings: DepthSettings) -> None:
    """Record the shaping settings in `folder`, unless they are there already (a record of
    other settings is replaced only where `check_dataset_settings` let them change)."""
    path = folder / FILE_NAME
    if path.exists() and _recorded(folder) == shaping_settings(settings):
        return
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(shaping_settings(settings), indent=2) + "\n")


def _holds_files(folder: Path) -> bool:
    """Whether anything was made there: a hidden partial file of a run killed before it
    finished one (`common.files.partial_path`) made nothing, and bound the folder to the
    settings a user had stopped the run to correct."""
    return folder.is_dir() and any(not entry.name.startswith(".") for entry in folder.iterdir())


def _recorded(folder: Path) -> dict[str, Any]:
    path = folder / FILE_NAME
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DatasetSettingsError(f"cannot read {path}: {exc}") from exc
    if not isinstance(recorded, dict):
        raise DatasetSettingsError(f"{path} is not a settings record")
    return recorded
