"""The inference service's settings: how it serves, and how clients reach it.

Read from `VIDFLOW_INFERENCE_*` variables; `vidflow serve` and the clients map each field to a
flag (see `common.settings.add_settings_arguments`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.certificates import pem_certificates
from common.settings import DEFAULT_CACHE_DIR, MAX_WAIT_S, Port, bind_address


class ServiceToken(BaseSettings):
    """The service's token: the server wants it with every classifier call, its clients send it
    (`InferenceSettings` holds it too). A secret read from the environment only, never a flag
    or a flow parameter (Prefect would store it)."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_INFERENCE_")

    auth_token: SecretStr | None = Field(
        None,
        description=(
            "a token every classifier call must carry, sent by the clients over TLS or to a "
            "loopback address (VIDFLOW_INFERENCE_AUTH_TOKEN only; health checks need none)"
        ),
    )

    @field_validator("auth_token", mode="before")
    @classmethod
    def _checked_token(cls, value: object) -> object:
        """An empty token is none (a `${VAR:-}` in a shell or compose file); one with
        characters an HTTP/2 header cannot carry is refused here (gRPC failed every call with
        UNAVAILABLE "Illegal metadata", a server looking down)."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value == "" or value is None:
            return None
        if not isinstance(value, str) or not all("!" <= char <= "~" for char in value):
            raise ValueError(
                "the token must be printable ASCII without spaces or line breaks (e.g. from "
                "`openssl rand -hex 32`)"
            )
        return value


class ModelSource(BaseSettings):
    """Which registry model, from which weights, and where its exports are cached: all that
    `vidflow export-onnx` reads. Apart from the serving settings, whose checks refused an
    export when the environment held a variable meant for `vidflow serve` (an ONNX file, TLS)."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_INFERENCE_")

    model: str = Field("efficientnet_lite0", description="model name from the registry")
    weights: Path | None = Field(
        None, description="local weights file (state_dict); default: the model's own source"
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR / "models", description="where exported models are cached"
    )

    @field_validator("weights", mode="before")
    @classmethod
    def _empty_weights_is_none(cls, value: object) -> object:
        """An empty variable (compose's `${WEIGHTS:-}`) is no file, not the current folder."""
        return None if value == "" else value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return DEFAULT_CACHE_DIR / "models" if value == "" else value


class InferenceSettings(ModelSource, ServiceToken):
    """The gRPC inference service (`vidflow serve`): its model (`ModelSource`) and its token
    (`ServiceToken`) included."""

    # `inf` passed the bounds below and then failed the waits it reached (Python's lock and
    # queue timeouts refuse it): a model worker died and its calls waited for ever.
    model_config = SettingsConfigDict(env_prefix="VIDFLOW_INFERENCE_", allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="address the gRPC and HTTP ports bind to")
    port: Port = Field(50051, description="gRPC port")
    http_port: Port = Field(8000, description="HTTP port for /healthz, /readyz and /metrics")
    # The image's health check reads it: it followed only VIDFLOW_INFERENCE_HTTP_PORT, and a
    # container started `serve --http-port 9000` (or 0) stayed unhealthy for good.
    http_port_file: Path | None = Field(
        None, description="file the server writes its bound HTTP port to, once it listens"
    )
    onnx_model: Path | None = Field(
        None,
        description="a ready exported .onnx file (onnx backend only; needs no torch at run time)",
    )
    backend: Literal["eager", "torchscript", "onnx"] = Field(
        "onnx", description="inference backend"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run the model")
    strict_device: bool = Field(False, description="fail instead of falling back to CPU")
    max_batch_size: int = Field(8, ge=1, description="largest batch the batcher forms")
    max_batch_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="longest a batch waits to fill with requests already in the server (a lone "
        "request is never held back)",
    )
    batching: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "hold requests to form batches: on, off (each request runs alone at once), or auto: "
            "on only if the model, measured at start-up on this device, does more images/s at "
            "--max-batch-size than at batch 1 (--batching-min-speedup); the verdict is kept in "
            "--cache-dir for the next start of the same model and settings on this machine"
        ),
    )
    batching_min_speedup: float = Field(
        1.25,
        gt=1.0,
        description="the gain in images/s from batch 1 to the largest batch that auto batches at",
    )
    # Bounded both ways: gRPC takes -1 for no limit at all, and 0 would refuse every request.
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description="largest request accepted (RESOURCE_EXHAUSTED above)",
    )
    # Pillow refuses to read the header of anything larger (twice its MAX_IMAGE_PIXELS).
    max_image_pixels: int = Field(
        40_000_000, ge=1, le=178_956_970, description="largest image (width x height) accepted"
    )
    max_concurrent_rpcs: int = Field(
        256,
        ge=1,
        description="Classify and ClassifyStream calls held at once; more get RESOURCE_EXHAUSTED "
        "(a call holds up to --max-message-bytes, a stream up to 32 MiB of images or one larger "
        "one, each about twice in memory as protobuf hands out a copy of the bytes: this "
        "bounds the memory). Health checks have room of their own",
    )
    idle_call_timeout_s: float = Field(
        60.0,
        gt=0,
        le=MAX_WAIT_S,
        description=(
            "a Classify call whose request has not fully arrived, or a ClassifyStream with "
            "nothing in flight and no next request, is ended after this long with "
            "DEADLINE_EXCEEDED, so that idle clients cannot hold the --max-concurrent-rpcs places; "
            "so is a health Check or Watch, or GetModelInfo, whose request has not arrived"
        ),
    )
    preprocess_threads: int = Field(
        0,
        ge=0,
        description="threads that decode one batch's images in parallel (0: its model worker)",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        description=(
            "model workers: batches run at once (0: auto: on onnx cores + 1 on CPU, 2 on CUDA; "
            "1 on torch backends)"
        ),
    )
    inference_threads: int = Field(
        0, ge=0, description="threads one model call may use (0: auto, cores / workers)"
    )
    model_worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "steps the model worker threads run below the rest of the server (Linux), so that "
            "receiving and answering requests never waits behind the model"
        ),
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=MAX_WAIT_S, description="how long SIGTERM waits for calls in flight"
    )
    hung_model_call_s: float = Field(
        30.0,
        gt=0,
        le=MAX_WAIT_S,
        description=(
            "a model call running this long is taken as stuck (a wedged GPU): health says "
            "NOT_SERVING until a call answers again"
        ),
    )
    tls_cert: Path | None = Field(
        None, description="serve gRPC over TLS with this PEM certificate (chain); needs --tls-key"
    )
    tls_key: Path | None = Field(None, description="the PEM private key of --tls-cert")
    reflection: bool = Field(
        True, description="offer gRPC server reflection (service listing for grpcurl and the like)"
    )

    @model_validator(mode="after")
    def _tls_cert_and_key_together(self) -> InferenceSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        return self

    # `[::1]` as `::1` (aiohttp's bind failed after gRPC had bound), and empty as the loopback
    # (gRPC refused it as a port "in use?"), as the consumer's metrics host
    _host_checked = field_validator("host")(bind_address)

    @field_validator("onnx_model", "tls_cert", "tls_key", "http_port_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty variable unsets its path (VIDFLOW_INFERENCE_ONNX_MODEL= unsets the serving
        image's file; compose's `${TLS_CERT:-}` gives ""): else it is Path(""), the current
        folder, and TLS turned on with a folder for a certificate (an empty port file's
        variable stopped the server, already listening, with "PosixPath('.') has an empty
        name")."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _onnx_model_alone(self) -> InferenceSettings:
        """A ready ONNX file is the whole model: refuse what would be silently ignored."""
        if self.onnx_model is None:
            return self
        # Named both ways: the serving image sets the variable, not the flag.
        given = "--onnx-model (or VIDFLOW_INFERENCE_ONNX_MODEL)"
        if self.backend != "onnx":
            raise ValueError(
                f"{given} is served by the onnx backend, not {self.backend}: "
                "unset it or use --backend onnx"
            )
        if self.weights is not None or "model" in self.model_fields_set:
            raise ValueError(
                f"{given} names its model itself: --model and --weights do not apply to it "
                "(unset it to serve a registry model)"
            )
        return self


class ClientSettings(BaseSettings):
    """How clients (`vidflow classify`, `vidflow loadtest`, the consumer) reach the service."""

    model_config = SettingsConfigDict(env_prefix="VIDFLOW_INFERENCE_")

    target: str = Field("127.0.0.1:50051", description="gRPC address HOST:PORT of the service")
    # FilePath: a missing CA file is refused with the settings, before a run starts.
    tls_ca: FilePath | None = Field(
        None, description="reach the service over TLS, trusting this PEM CA certificate"
    )

    @field_validator("tls_ca", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty VIDFLOW_INFERENCE_TLS_CA (compose's `${TLS_CA:-}`) is no CA: plaintext."""
        return None if value == "" else value

    @field_validator("tls_ca")
    @classmethod
    def _pem(cls, value: Path | None) -> Path | None:
        return None if value is None else pem_certificates(value)

    @model_validator(mode="after")
    def _port_given_in_plaintext(self) -> ClientSettings:
        """A host alone, without TLS, is refused: gRPC dials it at port 443, and `127.0.0.1`
        then read as "connection refused" from a server that was up at 50051. Over TLS a host
        alone may well mean 443 (a service behind an ingress)."""
        if self.tls_ca is None and target_lacks_port(self.target):
            raise ValueError(
                f"--target {self.target!r} has no port, so gRPC would dial 443: give HOST:PORT "
                "(the service listens on 50051 by default)"
            )
        return self


# gRPC's target schemes whose address is HOST[:PORT]; the others (unix:, xds:, ...) take none.
HOST_PORT_SCHEMES = ("dns:", "ipv4:", "ipv6:")
OTHER_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")


def target_lacks_port(target: str) -> bool:
    """Whether a gRPC target names a host without a port (gRPC then dials 443): `host`,
    `127.0.0.1`, `::1`, `[::1]`, `dns:///host`, `ipv4:10.0.0.1`, and a port that is no number."""
    if target.startswith(OTHER_SCHEMES):
        return False
    address = target
    if target.startswith(HOST_PORT_SCHEMES):
        address = target.split(":", 1)[1]
        address = address[2:].split("/", 1)[-1] if address.startswith("//") else address
        address = address.split(",", 1)[0]  # ipv4:a:1,b:2 lists several
    if address.startswith("["):
        host_end = address.find("]")
        return host_end < 0 or not address[host_end + 1 :].removeprefix(":").isdigit()
    if address.count(":") > 1:  # a bare IPv6 address: no room for a port
        return True
    return not address.rpartition(":")[2].isdigit() or ":" not in address
