"""Client SDK for modelserve: sync and asyncio clients over the generated gRPC stubs.

Imports grpcio and protobuf only (no torch), so a backend service can call a
modelserve server without the server's dependencies.
"""

from modelserve_client.client import (
    AsyncModelServeClient,
    ModelServeClient,
    Stream,
    channel_credentials,
    channel_target,
    generation_parameters,
    retry_service_config,
    service_config,
)
from modelserve_client.v1 import generation_pb2 as pb

__all__ = [
    "AsyncModelServeClient",
    "ModelServeClient",
    "Stream",
    "channel_credentials",
    "channel_target",
    "generation_parameters",
    "pb",
    "retry_service_config",
    "service_config",
]
