"""How vidflow's settings work, and the few that belong to no single part.

Each part owns its settings module: `services/inference/settings.py`,
`tasks/stream/settings.py`, `tasks/depth/settings.py`, and `flows/stream_settings.py` for the
stream-benchmark flow. Every setting of the first three is read from an environment variable
with a ``VIDFLOW_`` prefix (for example ``VIDFLOW_INFERENCE_PORT``) and can be overridden by the
matching CLI flag (``--port``), which `add_settings_arguments` generates from the model.
Precedence: flag (or flow parameter), then environment, then the default. The flow's own knobs
(`StreamBenchmarkSettings`) are flow parameters and flags only: they read no variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

# The real sample clips live beside the checkout (../shared/data), as in CI.
SAMPLE_VIDEOS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "videos"
SAMPLE_VIDEO = SAMPLE_VIDEOS_DIR / "k400_arm_wrestling.mp4"
KINETICS_VAL_CSV = SAMPLE_VIDEOS_DIR.parent / "kinetics" / "kinetics-400_val.csv"
# A TCP port to listen on; 0 lets the system choose a free one.
Port = Annotated[int, Field(ge=0, le=65535)]


# A description that says its own default ("default: off", "(default $VAR ...", "default 100"):
# the help adds none. Not "the broker's default.replication.factor" or "by default deleted",
# where the help left the flag's default out.
STATES_ITS_DEFAULT = re.compile(r"default:|\(default |default \d")


def bind_address(value: str) -> str:
    """An address to bind as written in a flag or variable: `[::1]` as `::1` (gRPC takes
    either, aiohttp's bind only the bare address; addresses are bracketed where written, in
    net.host_port), and an empty one (compose's `${HOST:-}`) as the default loopback, never
    every interface (which is what an empty address means to aiohttp and prometheus-client)."""
    value = value.strip()
    if not value:
        return "127.0.0.1"
    return value[1:-1] if value.startswith("[") and value.endswith("]") else value


# The longest wait a timeout may ask for: a day is far past any use, and under what the waits
# accept (subprocess's wait for ffmpeg overflowed past ~25 days; inf raised OverflowError in it,
# in aiohttp and in threading's waits, and gRPC read a deadline of inf as long past).
MAX_WAIT_S = 86_400.0
# XDG_CACHE_HOME only where it is an absolute path, as the XDG spec says: an empty or relative
# one put the cache in whatever folder a command ran from (the package's own, in a deployment).
_XDG_CACHE = os.environ.get("XDG_CACHE_HOME", "")
DEFAULT_CACHE_DIR = (
    Path(_XDG_CACHE) if os.path.isabs(_XDG_CACHE) else Path.home() / ".cache"
) / "vidflow"


class LogSettings(BaseSettings):
    """Where log lines go. Lines always carry ISO-8601 UTC timestamps."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_LOG_")

    level: str = Field("INFO", description="log level (DEBUG, INFO, WARNING, ERROR)")
    file: Path | None = Field(None, description="also append log lines to this file")

    @field_validator("level", mode="before")
    @classmethod
    def _known_level(cls, value: object) -> object:
        """A level logging knows, upper-cased: `VIDFLOW_LOG_LEVEL=verbose` was found only when
        the root logger was set, a traceback in `make demo` after its run folder was made."""
        if not isinstance(value, str):
            return value
        known = list(logging.getLevelNamesMapping())
        if value.strip().upper() not in known:
            raise ValueError(f"not a log level (one of {', '.join(known)})")
        return value.strip().upper()

    @field_validator("file", mode="before")
    @classmethod
    def _empty_file_is_none(cls, value: object) -> object:
        """An empty variable (compose's `${VIDFLOW_LOG_FILE:-}`) is no file, not the current
        folder (every command then failed: "Is a directory")."""
        return None if value == "" else value


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def flag_name(name: str) -> str:
    """The command-line flag of a settings field: `max_frames` -> `--max-frames`."""
    return "--" + name.replace("_", "-")


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[BaseModel], *, only: list[str] | None = None
) -> None:
    """Add one flag per settings field; flags default to None so unset ones fall through.

    A model that reads no variable (a flow's own parameters) gets its flags the same way, their
    help naming no variable; a description that names its own default is not told it again."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    reads_env = issubclass(settings_cls, BaseSettings)
    for name, field in settings_cls.model_fields.items():
        if only is not None and name not in only:
            continue
        description, env_name = field.description or "", f"{prefix}{name}".upper()
        notes = [f"env {env_name}"] if reads_env else []
        if field.is_required():
            notes.append("required")
        elif not STATES_ITS_DEFAULT.search(description):
            # argparse formats help with `%`: a default path holding one (`vidflow%20copy`)
            # made `--help` a traceback
            default = str(field.get_default(call_default_factory=True)).replace("%", "%%")
            notes.append(f"default {default}")
        help_text = f"{description} ({'; '.join(notes)})" if notes else description
        annotation = field.annotation
        if _is_secret(field):
            continue  # a secret comes from the environment: a flag's value is visible in `ps`
        if annotation is bool:
            parser.add_argument(
                flag_name(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices = get_args(annotation) if get_origin(annotation) is Literal else None
        parser.add_argument(
            flag_name(name), dest=name, default=None, choices=choices, help=help_text
        )


def settings_from_args(settings_cls: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """Build settings where given flags win over the environment and the defaults; a value
    that does not fit raises ValueError naming the flag, in one line (pydantic's own message
    spans several, with the whole input and a web link)."""
    given: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in settings_cls.model_fields and value is not None
    }
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        raise ValueError(one_line(exc, settings_cls, given)) from None


def one_line(
    exc: ValidationError,
    settings_cls: type[BaseModel] | None = None,
    flags_given: Collection[str] | None = None,
) -> str:
    """A settings ValidationError as one line naming each setting where it came from and its
    value: the flag if it was given (`flags_given`), else the environment variable of
    `settings_cls`. A secret's value is never shown (the line goes to the console and logs)."""
    env_prefix = settings_cls.model_config.get("env_prefix", "") if settings_cls else ""
    fields = settings_cls.model_fields if settings_cls else {}
    problems = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a check across settings: its message names the flags
            problems.append(message)
            continue
        name = str(error["loc"][0])
        env_name = f"{env_prefix}{name.upper()}"
        if error["type"] == "missing":  # the input is every flag given: not worth showing
            where = f" (or {env_name})" if env_prefix else ""
            problems.append(f"{flag_name(name)}{where} is required")
            continue
        from_env = env_prefix and flags_given is not None and name not in flags_given
        source = env_name if from_env else flag_name(name)
        if name in fields and _is_secret(fields[name]):
            problems.append(f"{source} (value not shown): {message}")
            continue
        problems.append(f"{source} {error.get('input')!r}: {message}")
    return "; ".join(problems)


def _is_secret(field: FieldInfo) -> bool:
    return SecretStr in (field.annotation, *get_args(field.annotation))
