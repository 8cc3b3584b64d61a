"""Object storage backends: the ObjectStore interface (base), S3 through
boto3 (s3), in memory (memory), and fault injection for tests (faults).

Contract and error model: docs/backend.md.
"""
from .base import (
    MAX_KEY_BYTES, MAX_PARTS, MAX_PUT_BYTES, MIN_PART_BYTES, AccessDenied,
    BackendError, CopyPart, DeleteFailure, InvalidCredentials, InvalidRequest, ListPage,
    NoSuchBucket, NotFound, ObjectInfo, ObjectStore, PreconditionFailed,
    StoreClosed, TransientError)
from .faults import Fault, FaultPlan, FaultyStore
from .memory import MemoryServer, MemoryStore

__all__ = [
    "ObjectStore", "ObjectInfo", "ListPage", "DeleteFailure", "CopyPart",
    "BackendError", "NotFound", "NoSuchBucket", "PreconditionFailed",
    "AccessDenied", "InvalidCredentials", "InvalidRequest", "TransientError",
    "StoreClosed", "MemoryStore", "MemoryServer", "S3Store",
    "Fault", "FaultPlan", "FaultyStore",
    "MAX_KEY_BYTES", "MAX_PARTS", "MAX_PUT_BYTES", "MIN_PART_BYTES",
]


def __getattr__(name: str):
    # S3Store imports boto3 (~0.3 s): only when asked for.
    if name == "S3Store":
        from .s3 import S3Store
        return S3Store
    raise AttributeError(name)
