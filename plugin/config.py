"""The node's configuration: one YAML file, validated by pydantic, every value with a default.

A wrong key or value fails at start with a message that names the key (`ConfigError`), so a
typo in a hospital's config never turns into a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from ai_models import totalseg_catalog
from ai_models.nnunet_folder import LABELS_FILE as NNUNET_LABELS
from ai_models.nnunet_folder import ModelFolderError, check_label_table, read_model_folder
from ai_models.resources import BUILTIN_RESOURCES, DEFAULT_RESOURCES, Resources
from dicom_io.labels import BUNDLE_LABELS, LabelSpec, load_label_table
from plugin.ingest.datadir import FileModes, file_modes


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


DEFAULT_AE_TITLE = "RADGATE"


class DicomConfig(_Strict):
    """The DICOM listener (SCP)."""

    ae_title: str = DEFAULT_AE_TITLE
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    max_pdu: int = Field(default=262144, ge=4096, description="largest PDU we accept, bytes")
    allowed_peers: list[AllowedPeer] = Field(default_factory=list, description="empty: anyone may associate")
    require_called_ae_title: bool = False
    max_associations: int = Field(default=16, ge=1)
    # Hostile peers (docs/design.md, "Ingest and transport"):
    max_associations_per_peer: int = Field(
        default=8, ge=1, description="concurrent associations from one IP address; more are rejected"
    )
    max_pending: int = Field(
        default=8,
        ge=1,
        description="connections not yet associated; a new one past this drops the oldest of them",
    )
    pdu_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a started PDU whose bytes stop coming for this long is aborted; also the longest "
        "wait for a whole A-ASSOCIATE-RQ after connecting and for a TLS handshake",
    )
    idle_timeout_s: float = Field(
        default=60.0, gt=0, description="an association with no PDU for this long is aborted"
    )
    receivers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="receiving processes sharing the port, each storing what it receives (concurrent "
        "associations run on several cores)",
    )
    # What one dataset may be (dicom_io.net.DatasetLimits); past a limit: 0xC000 and one log line.
    max_dataset_bytes: int = Field(
        default=2047 << 20, ge=1024, description="largest dataset accepted, bytes (after the file meta)"
    )
    max_inflated_bytes: int = Field(
        default=256 << 20, ge=1024, description="largest Deflated Explicit VR dataset once inflated, bytes"
    )
    max_sequence_depth: int = Field(
        default=32, ge=1, le=64, description="deepest nesting of sequences in sequences"
    )
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


class PipelineResources(_Strict):
    """What one run of a pipeline needs (`ai_models.resources.Resources`), declared in the config."""

    cpus: float = Field(default=1.0, gt=0, le=256, description="CPU cores")
    gpus: float = Field(default=0.0, ge=0, le=1, description="a share of one GPU; 0: CPU only")
    gpu_memory_mb: int = Field(default=0, ge=0, description="GPU memory; placed by it where declared")
    cpu_fallback: bool = Field(default=True, description="may run on the CPU when no GPU is free")

    @model_validator(mode="after")
    def _cpu_allowed(self) -> PipelineResources:
        if self.gpus == 0 and not self.cpu_fallback:
            raise ValueError("a pipeline that needs no GPU (gpus: 0) must have cpu_fallback: true")
        return self


def _check_ray_address(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    rest = value.removeprefix("ray://")
    _check_host_port(rest)
    return value


class RayConfig(_Strict):
    """The Ray cluster jobs run on with ``executor.kind: ray`` (plugin/jobs/executor/ray_executor.py)."""

    address: str | None = Field(
        default=None,
        description="'auto' (the Ray of this machine), 'ray://HOST:10001' (Ray Client), 'HOST:6379' "
        "(the head's GCS); absent: the node starts a local Ray of its own",
    )
    num_cpus: int | None = Field(default=None, ge=1, description="local Ray only: CPUs; absent: all")
    num_gpus: int | None = Field(default=None, ge=0, description="local Ray only: GPUs; absent: all seen")
    object_store_mb: int = Field(default=256, ge=80, description="local Ray only: its object store")
    actors_per_pipeline: int | None = Field(
        default=None, ge=1, le=64, description="warm actors per pipeline; absent: one per GPU (one on CPU)"
    )
    idle_timeout_s: float = Field(default=600.0, gt=0, description="an actor idle this long is released")
    shared_paths: bool = Field(
        default=False,
        description="actors read the spool and write results_dir themselves (a shared file system); "
        "false: the node sends the series' bytes and writes the results it gets back",
    )
    oom_on_cpu: bool = Field(
        default=True, description="a CUDA out-of-memory run is repeated on the CPU where the pipeline allows"
    )
    resources: dict[str, PipelineResources] = Field(
        default_factory=dict, description="pipeline name -> its needs; absent: the pipeline's own declaration"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return _check_ray_address(v)


class ExecutorConfig(_Strict):
    """How jobs run: worker processes, the time limit and retries, and where results are written."""

    kind: Literal["local", "ray"] = Field(
        default="local", description="local: worker processes of this node; ray: actors on a Ray cluster"
    )
    ray: RayConfig = RayConfig()
    workers: int = Field(
        default=1, ge=1, le=64, description="jobs run at once: worker processes (with CUDA, one per GPU)"
    )
    job_timeout_s: float = Field(default=600.0, gt=0, description="a run longer than this is killed")
    lease_s: float = Field(
        default=60.0, gt=0, description="a job whose worker stops renewing for this long is taken over"
    )
    max_attempts: int = Field(default=3, ge=1, description="runs of a job before it is FAILED for good")
    poll_s: float = Field(default=1.0, gt=0, description="how often an idle worker looks for queued jobs")
    results_dir: Path | None = Field(default=None, description="default: <data_dir>/results")


class ClusterConfig(_Strict):
    """Several nodes on one store (PostgreSQL): the folder they all mount and this node's name in it."""

    shared_dir: Path | None = Field(
        default=None,
        description="a folder every node mounts at the same path: the spool, each node's incoming "
        "folder and the results live there, so any node can run any job and send any result; "
        "default: none, everything in data_dir (one node)",
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="this node's name, unique in the cluster: its incoming folder in shared_dir",
    )

    @field_validator("node_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(_NAME_PATTERN, v) or len(v) > 64:
            raise ValueError(f"node name {v!r}: up to 64 letters, digits, '_', '.', '-'")
        return v


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. audit.hospital.local:514")
    return value


class AuditConfig(_Strict):
    """Where the audit trail goes besides the job store: IHE ATNA messages (RFC 5424 syslog)."""

    syslog: str | None = Field(
        default=None, description="HOST:PORT of an ATNA audit record repository; absent: store only"
    )
    syslog_protocol: Literal["udp", "tcp"] = Field(
        default="udp", description="udp: RFC 5426, one datagram per message; tcp: RFC 6587 octet counting"
    )

    @field_validator("syslog")
    @classmethod
    def _syslog(cls, v: str | None) -> str | None:
        return None if v is None else _check_host_port(v)


class WebConfig(_Strict):
    """The web console, REST API and /metrics (plugin/web), served by `radgate serve` and `radgate web`."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="loopback only by default")
    port: int = Field(default=8080, ge=0, le=65535, description="0: any free port (logged at start)")
    session_minutes: int = Field(
        default=480, ge=1, le=10080, description="a login session ends after this long without a request"
    )
    login_failures: int = Field(
        default=5, ge=1, le=1000, description="failed logins that lock a name (login_lockout_minutes)"
    )
    login_lockout_minutes: int = Field(
        default=15, ge=1, le=1440, description="how far back failed logins count, and how long a lock lasts"
    )
    audit: AuditConfig = AuditConfig()
    viewer_url_template: str | None = Field(
        default=None,
        description="the console's 'open in viewer' link, {study_uid} replaced by the Study Instance UID, "
        "e.g. http://viewer:3000/viewer?StudyInstanceUIDs={study_uid}; absent: no link",
    )
    disk_warning_gb: float = Field(
        default=5.0, ge=0, description="the overview warns when the data dir's disk has less free (GB)"
    )

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if "{study_uid}" not in v:
            raise ValueError("must contain {study_uid}")
        _check_http_url(v.replace("{study_uid}", "1.2.3"))
        return v

    def viewer_url(self, study_uid: str) -> str | None:
        """The viewer link of a study (the UID URL-quoted), None when no template is configured."""
        if self.viewer_url_template is None:
            return None
        return self.viewer_url_template.replace("{study_uid}", quote(study_uid, safe=""))


class DispatchConfig(_Strict):
    """Sending results (plugin/dispatch/outbox.py): batches, capped exponential backoff, then DEAD."""

    workers: int = Field(
        default=1, ge=1, le=16, description="sending threads; destinations are sent in parallel"
    )
    batch_size: int = Field(
        default=32, ge=1, le=64, description="deliveries per association / STOW-RS request"
    )
    poll_interval_s: float = Field(default=1.0, gt=0, description="how often an idle sender looks for work")
    retry_base_s: float = Field(default=10.0, gt=0, description="delay after the first failure; doubles")
    retry_max_s: float = Field(default=3600.0, gt=0, description="the longest delay between attempts")
    retry_jitter: float = Field(
        default=0.2, ge=0, le=1, description="each delay is shortened by up to this fraction, at random"
    )
    max_attempts: int = Field(default=10, ge=1, description="attempts before a delivery is DEAD")
    claim_timeout_s: float = Field(
        default=600.0, gt=0, description="a SENDING claim older than this (its node died) is sent again"
    )
    timeout_s: float = Field(default=60.0, gt=0, description="network timeout per connection and request")

    @model_validator(mode="after")
    def _delays(self) -> DispatchConfig:
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("retry_max_s must not be below retry_base_s")
        return self


# --- destinations: where results go ------------------------------------------------------------

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

DEFAULT_RULE_NAME = "default_rule"
"""The rule name a decision carries when `default_rule` handled a series (reserved for that)."""


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


class ClientTLS(_Strict):
    """TLS towards a DICOM peer; present means on. ca_file verifies the peer, cert/key identify us."""

    ca_file: Path | None = Field(default=None, description="CA bundle; default: the system trust store")
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> ClientTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class SafePrivate(_Strict):
    """A private attribute the site has judged safe to keep: its creator and its element in the block."""

    creator: str = Field(min_length=1, max_length=64, description="the Private Creator value, exactly")
    group: StrictInt = Field(ge=0x0009, le=0xFFFF, description="an odd group, e.g. 0x0019")
    element: StrictInt = Field(ge=0x00, le=0xFF, description="the element's offset in the block, 0x00-0xFF")

    @field_validator("group")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("a private group is odd")
        return v


class Deidentify(_Strict):
    """De-identify what goes to one destination: PS3.15 Annex E Basic Profile plus chosen options."""

    profile: Literal["basic"] = "basic"
    retain_longitudinal_temporal: StrictBool = Field(
        default=False, description="Retain Longitudinal Temporal Information, Full Dates Option"
    )
    retain_patient_characteristics: StrictBool = False
    clean_descriptors: StrictBool = Field(
        default=False, description="keep descriptions and comments with the patient's identifiers cut out"
    )
    retain_safe_private: list[SafePrivate] = Field(
        default_factory=list, description="private attributes kept; every other private attribute goes"
    )
    include_source: StrictBool = Field(
        default=False, description="also send the job's source series, de-identified, so references resolve"
    )
    allow_burned_in: StrictBool = Field(
        default=False, description="send series flagged BurnedInAnnotation YES de-identified all the same"
    )
    pseudonym_domain: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="destinations sharing a domain share pseudonyms; default the destination's name",
    )


class DicomDestination(_Strict):
    """A DICOM peer (PACS, archive) that receives results by C-STORE."""

    kind: Literal["dicom"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(description="the peer's AE title")
    calling_ae_title: str | None = Field(default=None, description="our AE title; default dicom.ae_title")
    tls: ClientTLS | None = Field(default=None, description="absent: plain TCP")
    deidentify: Deidentify | None = Field(default=None, description="absent: sent as they are")

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)


class BasicAuth(_Strict):
    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretStr


class BearerAuth(_Strict):
    type: Literal["bearer"]
    token: SecretStr


class DicomWebDestination(_Strict):
    """A DICOMweb server that receives results by STOW-RS (POST {url}/studies)."""

    kind: Literal["dicomweb"]
    url: str = Field(description="the DICOMweb root, e.g. https://pacs/dicom-web")
    auth: Annotated[BasicAuth | BearerAuth, Field(discriminator="type")] | None = None
    deidentify: Deidentify | None = Field(default=None, description="absent: sent as they are")

    _url = field_validator("url")(_check_http_url)


class OrthancDestination(_Strict):
    """An Orthanc server that receives results through its REST API (POST {url}/instances)."""

    kind: Literal["orthanc"]
    url: str = Field(description="Orthanc's REST root, e.g. http://orthanc:8042")
    username: str | None = None
    password: SecretStr | None = None
    deidentify: Deidentify | None = Field(default=None, description="absent: sent as they are")

    _url = field_validator("url")(_check_http_url)

    @model_validator(mode="after")
    def _pair(self) -> OrthancDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


Destination = Annotated[
    DicomDestination | DicomWebDestination | OrthancDestination, Field(discriminator="kind")
]


# --- sources: archives radgate pulls studies from (plugin/fetch) ---------------------------------


class DicomSource(_Strict):
    """A PACS queried by C-FIND (study and series level) and retrieved from by C-MOVE or C-GET."""

    kind: Literal["dicom"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(description="the PACS's AE title")
    calling_ae_title: str | None = Field(default=None, description="our AE title; default dicom.ae_title")
    retrieve: Literal["move", "get"] = Field(
        default="move",
        description="move: C-MOVE to move_destination (the node's listener receives); get: C-GET, "
        "the instances come back on our own association",
    )
    move_destination: str | None = Field(
        default=None, description="the AE title the PACS sends to on C-MOVE; default dicom.ae_title"
    )
    timeout_s: float = Field(
        default=30.0, gt=0, description="connection, association and the longest wait for each response"
    )
    tls: ClientTLS | None = Field(default=None, description="absent: plain TCP")

    @field_validator("ae_title", "calling_ae_title", "move_destination")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)


class DicomWebSource(_Strict):
    """A DICOMweb archive queried by QIDO-RS and retrieved from by WADO-RS, under one root URL."""

    kind: Literal["dicomweb"]
    url: str = Field(description="the DICOMweb root, e.g. https://pacs/dicom-web")
    auth: Annotated[BasicAuth | BearerAuth, Field(discriminator="type")] | None = None
    timeout_s: float = Field(default=30.0, gt=0, description="connection and read timeout per request")

    _url = field_validator("url")(_check_http_url)


Source = Annotated[DicomSource | DicomWebSource, Field(discriminator="kind")]
SourceConfig = DicomSource | DicomWebSource
"""A configured source, as `plugin.fetch` takes it."""


class FetchConfig(_Strict):
    """Working fetch requests (plugin/fetch/requests.py): polling, the claim, retries with backoff."""

    poll_interval_s: float = Field(default=2.0, gt=0, description="how often an idle node looks for requests")
    lease_s: float = Field(
        default=300.0,
        gt=0,
        description="a request whose node stopped renewing its claim this long is taken over",
    )
    retry_base_s: float = Field(default=30.0, gt=0, description="delay after the first failure; doubles")
    retry_max_s: float = Field(default=1800.0, gt=0, description="the longest delay between attempts")
    max_attempts: int = Field(default=5, ge=1, description="attempts before a request is FAILED")

    @model_validator(mode="after")
    def _delays(self) -> FetchConfig:
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("retry_max_s must not be below retry_base_s")
        return self


# --- pipelines: registered pipelines configured under names of their own ---------------------


LabelTable = Path | dict[int, dict[str, Any]]
"""A label table as the config gives it: a JSON file, or the JSON form inline (dicom_io.labels)."""


def _absolute(path: LabelTable | None) -> LabelTable | None:
    """A path made absolute (workers may run in another current directory); anything else as is."""
    return path.resolve() if isinstance(path, Path) else path


def _where(source: LabelTable) -> str:
    return "inline table" if isinstance(source, dict) else str(source)


def _label_table(source: LabelTable) -> dict[int, LabelSpec]:
    """The parsed label table; ValueError "labels (<file or inline table>): <what is wrong>"."""
    try:
        return load_label_table(source)
    except (OSError, ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"labels ({_where(source)}): {err}") from None


class MonaiBundlePipelineConfig(_Strict):
    """A MONAI bundle (ai_models.monai_bundle) run under the name it has in `pipelines`.

    Checked at load, not at the first job: the folder exists and the label table parses.
    """

    kind: Literal["monai-bundle"]
    bundle_dir: Path = Field(description="the bundle's folder (configs/, models/model.pt)")
    labels: LabelTable | None = Field(
        default=None,
        description="label value -> coded segment: a JSON file or an inline table; "
        f"absent: {BUNDLE_LABELS} in the bundle",
    )
    modalities: list[str] | None = Field(
        default=None, min_length=1, description="DICOM modalities it accepts; absent: the bundle's metadata"
    )
    min_slices: int = Field(default=1, ge=1, description="fewer slices: the job fails with the reason")

    @field_validator("bundle_dir")
    @classmethod
    def _bundle_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"{v} is not a folder")
        return v.resolve()  # workers may run elsewhere than the current directory

    @field_validator("labels")
    @classmethod
    def _labels_path(cls, v: LabelTable | None) -> LabelTable | None:
        return _absolute(v)

    @model_validator(mode="after")
    def _labels_parse(self) -> MonaiBundlePipelineConfig:
        _label_table(self.bundle_dir / BUNDLE_LABELS if self.labels is None else self.labels)
        return self

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the pipeline's constructor."""
        return {
            "bundle_dir": self.bundle_dir,
            "labels": self.labels,
            "modalities": None if self.modalities is None else tuple(self.modalities),
            "min_slices": self.min_slices,
        }


class NnunetPipelineConfig(_Strict):
    """An nnU-Net v2 trained model folder (ai_models.nnunet) run under the name it has in `pipelines`.

    Checked at load, without torch: the folder's dataset.json, plans.json, configuration and
    checkpoints (`ai_models.nnunet_folder`), and the label table against the model's labels.
    """

    kind: Literal["nnunet"]
    model_dir: Path = Field(description="the trained model folder (dataset.json, plans.json, fold_N/)")
    labels: LabelTable | None = Field(
        default=None,
        description="label value -> coded segment: a JSON file or an inline table; "
        f"absent: {NNUNET_LABELS} in the model folder",
    )
    configuration: str | None = Field(
        default=None,
        min_length=1,
        description="the plans' configuration the weights were trained with (3d_fullres, 2d, ...); "
        "absent: from the folder name <trainer>__<plans>__<configuration>, or the only one",
    )
    folds: list[Annotated[int, Field(ge=0)] | Literal["all"]] | None = Field(
        default=None, min_length=1, description="folds to ensemble; absent: every fold_N with the checkpoint"
    )
    checkpoint: str = Field(default="checkpoint_final.pth", description="or checkpoint_best.pth")
    tile_step_size: float = Field(default=0.5, gt=0.0, le=1.0, description="sliding-window step (patches)")
    use_mirroring: bool = Field(default=True, description="test-time mirroring: better, up to 8x slower")
    orientation: Literal["RAS", "LPS", "native"] = Field(
        default="RAS", description="the orientation the model was trained in (ai_models.nnunet.ORIENTATIONS)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: the GPU when there is one; cpu: always the CPU"
    )
    modalities: list[str] | None = Field(
        default=None, min_length=1, description="DICOM modalities it accepts; absent: its input channel's"
    )
    min_slices: int = Field(default=1, ge=1, description="fewer slices: the job fails with the reason")

    @field_validator("model_dir", "labels")
    @classmethod
    def _absolute(cls, v: LabelTable | None) -> LabelTable | None:
        return _absolute(v)

    @model_validator(mode="after")
    def _model_and_labels(self) -> NnunetPipelineConfig:
        try:
            folder = read_model_folder(self.model_dir, self.configuration, self.folds, self.checkpoint)
        except ModelFolderError as err:
            raise ValueError(f"model_dir: {err}") from None
        source = folder.path / NNUNET_LABELS if self.labels is None else self.labels
        table = _label_table(source)
        try:
            check_label_table(table, folder)
        except ValueError as err:
            raise ValueError(f"labels ({_where(source)}): {err}") from None
        return self

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the pipeline's constructor."""
        options = self.model_dump(exclude={"kind"})
        options["modalities"] = None if self.modalities is None else tuple(self.modalities)
        return options


class TotalSegmentatorPipelineConfig(_Strict):
    """TotalSegmentator's task `total` (ai_models.totalsegmentator) with weights the site placed.

    Checked at load: the package is installed, every weight folder the mode needs is in
    `weights_dir` (else the error names the command that fetches them) and roi_subset names
    structures of the task. Nothing is downloaded, at load or at run time.
    """

    kind: Literal["totalsegmentator"]
    weights_dir: Path = Field(
        description="TOTALSEG_HOME_DIR layout: the models under nnunet/results/, as "
        "`TOTALSEG_HOME_DIR=<weights_dir> totalseg_download_weights -t total` (or total_fast) leaves them"
    )
    fast: bool = Field(default=False, description="the single 3 mm model instead of the five 1.5 mm ones")
    roi_subset: list[str] | None = Field(
        default=None,
        min_length=1,
        description="only these structures (TotalSegmentator's names); absent: all 117",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: the GPU of the worker's slot when it has one, else the CPU"
    )
    min_slices: int = Field(default=10, ge=1, description="fewer slices: the job fails with the reason")

    @field_validator("weights_dir")
    @classmethod
    def _weights_folder(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"{v} is not a folder")
        return v.resolve()  # workers may run elsewhere than the current directory

    @model_validator(mode="after")
    def _installed_and_placed(self) -> TotalSegmentatorPipelineConfig:
        try:
            totalseg_catalog.require_package()
            totalseg_catalog.check_roi_subset(self.roi_subset or ())
            totalseg_catalog.check_weights(self.weights_dir, self.fast, self.roi_subset is not None)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise ValueError(str(err)) from None
        return self

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the pipeline's constructor."""
        return {
            "weights_dir": self.weights_dir,
            "fast": self.fast,
            "roi_subset": None if self.roi_subset is None else tuple(self.roi_subset),
            "device": self.device,
            "min_slices": self.min_slices,
        }


PipelineConfig = Annotated[
    MonaiBundlePipelineConfig | NnunetPipelineConfig | TotalSegmentatorPipelineConfig,
    Field(discriminator="kind"),
]
"""What `pipelines` may hold, by `kind`."""


# --- rules: which pipeline runs on a series (evaluated in plugin/route/rules.py) --------------------

Scalar = StrictStr | StrictInt | StrictFloat

_MATCHER_TESTS = ("equals", "one_of", "regex", "range", "present", "absent")


class NumericRange(_Strict):
    """Inclusive numeric bounds; either one may be left open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> NumericRange:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self


class Matcher(_Strict):
    """One test on one DICOM attribute: exactly one of equals, one_of, regex, range, present, absent.

    A number in equals/one_of compares numerically; a string compares as text. ignore_case applies
    to equals, one_of and regex. The regex is compiled here so a bad one fails at load.
    """

    equals: Scalar | None = None
    one_of: list[Scalar] | None = Field(default=None, min_length=1)
    regex: str | None = Field(default=None, description="re.search: matches anywhere unless anchored")
    ignore_case: bool = False
    range: NumericRange | None = None
    present: Literal[True] | None = None
    absent: Literal[True] | None = None
    _pattern: re.Pattern[str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_test(self) -> Matcher:
        given = [name for name in _MATCHER_TESTS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a matcher needs exactly one of {', '.join(_MATCHER_TESTS)}, got {given}")
        if self.regex is not None:
            try:
                self._pattern = re.compile(self.regex, re.IGNORECASE if self.ignore_case else 0)
            except re.error as err:
                raise ValueError(f"invalid regex {self.regex!r}: {err}") from None
        return self

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """The compiled regex (None unless this is a regex matcher)."""
        return self._pattern


MatchGroup = dict[str, Matcher]
"""DICOM keyword -> test; every test of a group must hold (AND)."""


def _check_keywords(rule: str, group: MatchGroup) -> MatchGroup:
    for keyword in group:
        tag = tag_for_keyword(keyword)
        if tag is None:
            close = get_close_matches(keyword, keyword_dict, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"rule {rule!r}: unknown DICOM keyword {keyword!r}{hint}")
        if dictionary_VR(tag) == "SQ":
            raise ValueError(f"rule {rule!r}: {keyword} is a sequence; match on an attribute with a value")
    return group


class RequiredSeries(_Strict):
    """A series a rule needs before it runs (e.g. the thin-slice reconstruction), named by the same
    tests as a rule's `match`; waited for, and pulled from a source when `pull_from` names one."""

    match: MatchGroup = Field(min_length=1, description="the tests the needed series passes")
    wait_minutes: float = Field(default=30.0, ge=0, description="how long the job waits for it")
    pull_from: str | None = Field(default=None, description="a source (`sources`) to pull it from")
    after_wait: Literal["run", "skip"] = Field(
        default="run", description="run: on the series there are; skip: no run, with the reason"
    )


PriorSame = Literal["modality", "study_description"]


class PriorRequirement(_Strict):
    """The patient's most recent earlier study of the same kind, found on `source` by C-FIND (or
    QIDO-RS), pulled, and run through the same pipeline unless radgate has its result already."""

    source: str = Field(description="a source (`sources`) to look for and pull the prior from")
    same: tuple[PriorSame, ...] = Field(
        default=("modality",), description="what the prior shares with this study"
    )
    max_age_days: int = Field(default=3650, ge=1, description="older studies are not priors")
    wait_minutes: float = Field(
        default=60.0, ge=0, description="how long finding, pulling and processing the prior may take"
    )
    deliver: bool = Field(default=False, description="true: the prior's own results go out too")


class Requirements(_Strict):
    """What a rule needs before its job runs (`plugin.route.requires`); the job WAITS until then."""

    series: RequiredSeries | None = None
    prior: PriorRequirement | None = None

    @model_validator(mode="after")
    def _something(self) -> Requirements:
        if self.series is None and self.prior is None:
            raise ValueError("requires needs series, prior or both")
        return self


class RuleAction(_Strict):
    """What a rule does: the pipeline to run and where its results go."""

    pipeline: str = Field(min_length=1, description="checked against the installed pipelines at start")
    destinations: list[str] | None = Field(
        default=None, description="names from `destinations`; absent: all of them; []: keep results locally"
    )


class DefaultRule(RuleAction):
    """What happens to a series no rule matches (series scope). No default_rule: no job for it."""


class Rule(RuleAction):
    """A named routing rule: all of `match` and, when given, at least one `any_of` group must hold."""

    name: str = Field(pattern=_NAME_PATTERN)
    enabled: bool = True
    scope: Literal["series", "study"] = Field(
        default="series", description="series: one job per matching series; study: one per study"
    )
    match: MatchGroup = Field(default_factory=dict)
    any_of: list[MatchGroup] = Field(default_factory=list, description="OR of groups, ANDed with match")
    requires: Requirements | None = Field(default=None, description="a series or a prior it waits for")

    @field_validator("match")
    @classmethod
    def _match_keywords(cls, v: MatchGroup, info: ValidationInfo) -> MatchGroup:
        return _check_keywords(info.data.get("name", "?"), v)

    @field_validator("any_of")
    @classmethod
    def _any_of_keywords(cls, v: list[MatchGroup], info: ValidationInfo) -> list[MatchGroup]:
        if any(not group for group in v):
            raise ValueError("an any_of group must not be empty")
        return [_check_keywords(info.data.get("name", "?"), group) for group in v]

    @model_validator(mode="after")
    def _not_empty(self) -> Rule:
        if not self.match and not self.any_of:
            raise ValueError(f"rule {self.name!r} has no matcher; use default_rule for a catch-all")
        if self.requires is not None and self.requires.series is not None:
            _check_keywords(self.name, self.requires.series.match)
            if self.scope != "study":
                raise ValueError(
                    f"rule {self.name!r}: requires.series needs scope: study"
                    " (the job runs once, on the required series when it is there)"
                )
        return self


def _check_destination_names(owner: str, names: list[str] | None, known: dict[str, Destination]) -> None:
    for name in names or ():
        if name not in known:
            listed = ", ".join(known) or "none are configured"
            raise ValueError(f"{owner} destinations: unknown destination {name!r} (known: {listed})")


def _check_requires_sources(rule: str, requires: Requirements, known: dict[str, Source]) -> None:
    named = [
        requires.series.pull_from if requires.series else None,
        requires.prior.source if requires.prior else None,
    ]
    for name in filter(None, named):
        if name not in known:
            listed = ", ".join(known) or "none are configured"
            raise ValueError(f"rule {rule!r} requires: unknown source {name!r} (known: {listed})")


class Config(_Strict):
    """The whole node configuration (see radgate.example.yaml for every key, commented)."""

    data_dir: Path = Path("./radgate-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    group_readable: bool = Field(
        default=False,
        description="files and folders the node creates: 0640/0750 (its group may read) instead of "
        "0600/0700 (its own user only); never readable by other users",
    )
    dicom: DicomConfig = DicomConfig()
    completion: CompletionConfig = CompletionConfig()
    executor: ExecutorConfig = ExecutorConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="name -> destination; empty: results stay in data_dir only"
    )
    dispatch: DispatchConfig = DispatchConfig()
    sources: dict[str, Source] = Field(
        default_factory=dict, description="name -> an archive `radgate fetch` pulls studies from"
    )
    fetch: FetchConfig = FetchConfig()
    web: WebConfig = WebConfig()
    pipelines: dict[str, PipelineConfig] = Field(
        default_factory=dict, description="name -> a registered pipeline with its options; rules name it"
    )
    rules: list[Rule] | None = Field(
        default=None, description="ordered, first match wins; absent: the shipped default rules"
    )
    default_rule: DefaultRule | None = None

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, v: dict[str, Destination]) -> dict[str, Destination]:
        for name in v:
            if not re.match(_NAME_PATTERN, name):
                raise ValueError(f"destination name {name!r}: use letters, digits, '_', '.', '-'")
        return v

    @field_validator("sources")
    @classmethod
    def _source_names(cls, v: dict[str, Source], info: ValidationInfo) -> dict[str, Source]:
        """Checked names; a DICOM source's calling AE title and C-MOVE destination default to ours."""
        ours = info.data["dicom"].ae_title if "dicom" in info.data else DEFAULT_AE_TITLE
        for name in v:
            if not re.match(_NAME_PATTERN, name) or len(name) > 64:
                raise ValueError(f"source name {name!r}: up to 64 letters, digits, '_', '.', '-'")
        return {
            name: source.model_copy(
                update={
                    "calling_ae_title": source.calling_ae_title or ours,
                    "move_destination": source.move_destination or ours,
                }
            )
            if isinstance(source, DicomSource)
            else source
            for name, source in v.items()
        }

    @field_validator("pipelines")
    @classmethod
    def _pipeline_names(cls, v: dict[str, PipelineConfig]) -> dict[str, PipelineConfig]:
        for name in v:
            if not re.match(_NAME_PATTERN, name) or len(name) > 64:
                raise ValueError(f"pipeline name {name!r}: up to 64 letters, digits, '_', '.', '-'")
        return v

    @field_validator("rules")
    @classmethod
    def _rules_refer_to_known(cls, v: list[Rule] | None, info: ValidationInfo) -> list[Rule] | None:
        seen: set[str] = set()
        for rule in v or ():
            if rule.name in seen or rule.name == DEFAULT_RULE_NAME:
                raise ValueError(f"rule name {rule.name!r} is used twice or reserved")
            seen.add(rule.name)
            if "destinations" in info.data:
                _check_destination_names(f"rule {rule.name!r}", rule.destinations, info.data["destinations"])
            if rule.requires is not None and "sources" in info.data:
                _check_requires_sources(rule.name, rule.requires, info.data["sources"])
        return v

    @field_validator("default_rule")
    @classmethod
    def _default_refers_to_known(cls, v: DefaultRule | None, info: ValidationInfo) -> DefaultRule | None:
        if v is not None and "destinations" in info.data:
            _check_destination_names(DEFAULT_RULE_NAME, v.destinations, info.data["destinations"])
        return v

    def pipeline_options(self, name: str) -> tuple[str, dict[str, Any]]:
        """The registered pipeline `name` stands for and its constructor options.

        A configured name wins over a registered pipeline of the same name on this node; any other
        name is itself, without options (the registry says whether it exists).
        """
        configured = self.pipelines.get(name)
        return (name, {}) if configured is None else (configured.kind, configured.options())

    def pipeline_resources(self, name: str) -> Resources:
        """What one run of pipeline ``name`` needs: ``executor.ray.resources`` when it names it, else
        the declaration of the built-in it is (or is configured on), else `DEFAULT_RESOURCES`."""
        declared = self.executor.ray.resources.get(name)
        if declared is not None:
            return Resources(declared.cpus, declared.gpus, declared.gpu_memory_mb, declared.cpu_fallback)
        kind, _ = self.pipeline_options(name)
        return BUILTIN_RESOURCES.get(kind, DEFAULT_RESOURCES)

    @property
    def spool_dir(self) -> Path:
        """The received instances: ``<cluster.shared_dir>/spool`` in a cluster, else ``<data_dir>/spool``."""
        shared = self.cluster.shared_dir
        return shared / "spool" if shared is not None else self.data_dir / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Temporary files being received; on the spool's file system so they can be linked in, and
        this node's own (its start empties it): ``<cluster.shared_dir>/incoming/<node_name>`` in a cluster."""
        shared = self.cluster.shared_dir
        if shared is None:
            return self.data_dir / "incoming"
        return shared / "incoming" / self.cluster.node_name

    @property
    def secrets_dir(self) -> Path:
        """Where the pseudonym secret lies (`plugin.dispatch.pseudonyms`): shared by a cluster's
        nodes (``cluster.shared_dir``), so that every node maps a value the same way; else data_dir."""
        return self.cluster.shared_dir or self.data_dir

    @property
    def quarantine_dir(self) -> Path:
        """Spool files found at start that are not usable instances."""
        return self.data_dir / "quarantine"

    @property
    def metrics_dir(self) -> Path:
        """The receiving processes' counters (`plugin.ingest.counters`), read by ``/metrics``."""
        return self.data_dir / "metrics"

    @property
    def results_dir(self) -> Path:
        """Where each job writes its result files, in ``<results_dir>/<job id>/``: ``executor.results_dir``,
        else ``<cluster.shared_dir>/results`` in a cluster, else ``<data_dir>/results``."""
        shared = self.cluster.shared_dir
        return self.executor.results_dir or (shared if shared is not None else self.data_dir) / "results"

    @property
    def file_modes(self) -> FileModes:
        """The modes of the files and folders the node creates (`plugin.ingest.datadir`)."""
        return file_modes(self.group_readable)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'radgate.db').resolve()}"

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with dotted keys replaced, e.g. {"dicom.port": 104}; validated like the file.

        A DICOM source's calling AE title and move destination that were ours follow a new
        ``dicom.ae_title``.
        """
        data = self.model_dump(mode="python")
        ours = self.dicom.ae_title
        if changes.get("dicom.ae_title") not in (None, ours):
            for source in data["sources"].values():
                for key in ("calling_ae_title", "move_destination"):
                    if source.get(key) == ours:
                        source[key] = None
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
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
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
