"""Server settings: defaults < ``ES_MERGING_*`` environment variables < CLI flags.

Environment variables (all optional):

    ES_MERGING_DATA_HOME      where the store, probes, models and the embedded zoo live
                              (default ``~/.local/share/es-merging``, or ``$XDG_DATA_HOME/es-merging``)
    ES_MERGING_ALLOW_ROOTS    extra allowed input roots, separated by ``os.pathsep``
    ES_MERGING_DATA_DIR       the real-data directory (allowed for reading; default ``../shared/data``
                              next to the checkout when it exists)
    ES_MERGING_ZOO_DIR        the embedded zoo directory (default ``$DATA_HOME/zoo``)
    ES_MERGING_ZOO_PRESET     preset used when the zoo must be built (default ``tiny``)
    ES_MERGING_BOOTSTRAP      ``0`` to skip registering/building the embedded zoo on first start
    ES_MERGING_MAX_LIST       max items in any list argument (default 1000)
    ES_MERGING_MAX_STRING     max characters in any string argument (default 40000)
    ES_MERGING_MAX_SCREEN_ROWS  max rows a screening job may produce (default 100000)
    ES_MERGING_MAX_JOBS       jobs running at once; the rest wait queued (default 1)
    ES_MERGING_WORKER_THREADS torch threads inside a job's worker process (default: cores - 1, >= 1)
    ES_MERGING_TOKEN          bearer token required by the HTTP transport
    ES_MERGING_HOST / ES_MERGING_PORT   HTTP bind address (default 127.0.0.1:8765)
    ES_MERGING_ALLOWED_HOSTS  extra Host header values accepted by DNS-rebinding protection
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "ES_MERGING_"
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "es-merging"


def _default_data_dir(env: Mapping[str, str]) -> Path | None:
    if env.get(ENV_PREFIX + "DATA_DIR"):
        return Path(env[ENV_PREFIX + "DATA_DIR"])
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _bool(raw: str) -> bool:
    return raw.strip().lower() not in {"0", "false", "no", "off", ""}


class Settings(BaseModel):
    """Everything the server needs to know; immutable once the server is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_home: Path = Field(default_factory=default_data_home)
    extra_roots: tuple[Path, ...] = ()
    include_cwd: bool = True
    data_dir: Path | None = None
    zoo_dir: Path | None = None
    zoo_preset: Literal["tiny", "test"] = "tiny"
    bootstrap: bool = True
    max_list: int = Field(1000, ge=1, le=1_000_000)
    max_string: int = Field(40_000, ge=16, le=10_000_000)
    max_screen_rows: int = Field(100_000, ge=1, le=100_000_000)
    max_jobs: int = Field(1, ge=1, le=64)
    worker_threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1), ge=1, le=256)
    token: str | None = Field(None, repr=False)
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    allowed_hosts: tuple[str, ...] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("data_home", "data_dir", "zoo_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(Path(value).expanduser()))

    @field_validator("extra_roots", mode="after")
    @classmethod
    def _absolute_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(Path(os.path.abspath(Path(v).expanduser())) for v in value)

    # ------------------------------------------------------------------ derived paths
    @property
    def store_path(self) -> Path:
        return self.data_home / "es-merging.sqlite3"

    @property
    def probes_dir(self) -> Path:
        return self.data_home / "probes"

    @property
    def models_dir(self) -> Path:
        return self.data_home / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_home / "jobs"

    @property
    def effective_zoo_dir(self) -> Path:
        return self.zoo_dir or (self.data_home / "zoo")

    @property
    def output_roots(self) -> tuple[Path, ...]:
        """Where tools may write (the data directory is read-only for us)."""
        roots = [self.data_home, *self.extra_roots]
        if self.include_cwd:
            roots.append(Path.cwd())
        return tuple(dict.fromkeys(roots))

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Where path arguments may point (reading)."""
        roots = list(self.output_roots)
        if self.data_dir is not None:
            roots.append(self.data_dir)
        if self.zoo_dir is not None:
            roots.append(self.zoo_dir)
        return tuple(dict.fromkeys(roots))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read ``ES_MERGING_*`` variables, then apply ``overrides`` (CLI flags; None = not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        get = lambda key: env.get(ENV_PREFIX + key)  # noqa: E731
        if get("DATA_HOME"):
            values["data_home"] = Path(get("DATA_HOME"))
        else:
            values["data_home"] = default_data_home(env)
        if get("ALLOW_ROOTS"):
            values["extra_roots"] = tuple(Path(p) for p in get("ALLOW_ROOTS").split(os.pathsep) if p)
        data_dir = _default_data_dir(env)
        if data_dir is not None:
            values["data_dir"] = data_dir
        if get("ZOO_DIR"):
            values["zoo_dir"] = Path(get("ZOO_DIR"))
        for key, name, conv in (
            ("ZOO_PRESET", "zoo_preset", str),
            ("BOOTSTRAP", "bootstrap", _bool),
            ("MAX_LIST", "max_list", int),
            ("MAX_STRING", "max_string", int),
            ("MAX_SCREEN_ROWS", "max_screen_rows", int),
            ("MAX_JOBS", "max_jobs", int),
            ("WORKER_THREADS", "worker_threads", int),
            ("TOKEN", "token", str),
            ("HOST", "host", str),
            ("PORT", "port", int),
            ("LOG_LEVEL", "log_level", str.upper),
        ):
            raw = get(key)
            if raw:
                try:
                    values[name] = conv(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{key}={raw!r} is not a valid value") from None
        if get("ALLOWED_HOSTS"):
            values["allowed_hosts"] = tuple(h.strip() for h in get("ALLOWED_HOSTS").split(",") if h.strip())
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "extra_roots":
                values["extra_roots"] = tuple(values.get("extra_roots", ())) + tuple(Path(v) for v in value)
            else:
                values[key] = value
        return cls(**values)
