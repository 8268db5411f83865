"""A typed, synchronous client for the lpnet REST API (httpx).

    from lpnet.client import Client

    with Client("http://127.0.0.1:8000", key="lpn_...") as client:
        answer = client.latency("laptop-1t", "resnet50")
        accepted = client.create_plan("laptop-1t", "resnet50", budget_ms=0.6 * answer.total_ms)
        plan = client.wait_plan(accepted.job_id, progress=print)

Answers are parsed into the models of `lpnet.client.answers`, which mirror the server's response
schemas. Error answers are raised as `ApiError` subclasses chosen by status, carrying the server's
error code (`lpnet.client.errors`). 429 and 503 answers are retried after the server's
``Retry-After`` (or an exponential backoff when it sends none), up to ``retries`` times and as long as
the wait is at most ``max_retry_wait`` seconds; connection failures of GET requests are retried the
same way.

Architectures are sent as the server takes them: a torchvision name (with an input shape), the IR
(`lpnet.arch.ir.Network` or its dict), or an ONNX file (bytes or a path, uploaded); an nn.Module is
traced into the IR on this machine first (`lpnet.client.architectures`).
"""

from lpnet.client.answers import (
    BatchLatency,
    Device,
    DeviceCreated,
    DeviceStatus,
    Job,
    JobAccepted,
    Latency,
    LayerLatency,
    ModelUpload,
    Plan,
    Predictor,
    PredictorRef,
    PredictorSummary,
    ProfileSubmission,
)
from lpnet.client.architectures import Architecture
from lpnet.client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    InvalidRequest,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServerUnreachable,
    ServiceUnavailable,
    Unauthorized,
    WaitTimeout,
)
from lpnet.client.sync import Client, RetryEvent

__all__ = [
    "ApiError",
    "Architecture",
    "BadRequest",
    "BatchLatency",
    "Client",
    "ClientError",
    "Conflict",
    "Device",
    "DeviceCreated",
    "DeviceStatus",
    "Forbidden",
    "InvalidRequest",
    "Job",
    "JobAccepted",
    "JobFailed",
    "Latency",
    "LayerLatency",
    "ModelUpload",
    "NotFound",
    "PayloadTooLarge",
    "Plan",
    "Predictor",
    "PredictorRef",
    "PredictorSummary",
    "ProfileSubmission",
    "RateLimited",
    "RetryEvent",
    "ServerError",
    "ServerUnreachable",
    "ServiceUnavailable",
    "Unauthorized",
    "WaitTimeout",
]
