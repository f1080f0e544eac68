"""The node's configuration: one YAML file, validated by pydantic, every value with a default.

A wrong key or value fails at start with a message that names the key (`ConfigError`), so a
typo in a hospital's config never turns into a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """The configuration file is unreadable or has a wrong key or value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not value or len(value) > 16 or not value.isascii() or "\\" in value or not value.strip():
        raise ValueError("an AE title is 1 to 16 ASCII characters without backslash")
    return value.strip()


class AllowedPeer(_Strict):
    """A peer that may associate: a calling AE title, an address or network, or both."""

    ae_title: str | None = None
    address: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.ip_network(v, strict=False)
        return v

    @model_validator(mode="after")
    def _one_of(self) -> AllowedPeer:
        if self.ae_title is None and self.address is None:
            raise ValueError("an allowed peer needs ae_title, address or both")
        return self

    def admits(self, ae_title: str, address: str) -> bool:
        if self.ae_title is not None and self.ae_title != ae_title.strip():
            return False
        if self.address is not None:
            try:
                return ipaddress.ip_address(address) in ipaddress.ip_network(self.address, strict=False)
            except ValueError:
                return False
        return True


class TLSConfig(_Strict):
    """TLS on the DICOM port (DICOM PS3.15 secure transport); off unless cert and key are given."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(
        default=None, description="CA bundle; when set, peers must present a certificate"
    )

    @model_validator(mode="after")
    def _files(self) -> TLSConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        return self


class DicomConfig(_Strict):
    """The DICOM listener (SCP)."""

    ae_title: str = "RADGATE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    max_pdu: int = Field(default=262144, ge=4096, description="largest PDU we accept, bytes")
    allowed_peers: list[AllowedPeer] = Field(default_factory=list, description="empty: anyone may associate")
    require_called_ae_title: bool = False
    max_associations: int = Field(default=16, ge=1)
    receivers: int = Field(default=1, ge=1, le=64, description="receiving processes sharing the port")
    tls: TLSConfig = TLSConfig()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)


class CompletionConfig(_Strict):
    """When a study counts as complete."""

    quiet_period_s: float = Field(default=10.0, gt=0, description="no new instance for this long")
    after_release_s: float = Field(
        default=1.0, ge=0, description="quiet period once the sending association has been released"
    )


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False


class Config(_Strict):
    """The whole node configuration (see radgate.example.yaml for every key, commented)."""

    data_dir: Path = Path("./radgate-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    dicom: DicomConfig = DicomConfig()
    completion: CompletionConfig = CompletionConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'radgate.db').resolve()}"

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with dotted keys replaced, e.g. {"dicom.port": 104}; validated like the file."""
        data = self.model_dump(mode="python")
        for dotted, value in changes.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return _validate(data, source="command line")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _validate(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: Path | None) -> Config:
    """Read and validate a YAML config; no path gives the embedded defaults."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read configuration {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"configuration {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration {path} must be a mapping of keys, got {type(data).__name__}")
    return _validate(data, source=str(path))
