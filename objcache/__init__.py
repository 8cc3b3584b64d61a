"""objcache: an elastic caching filesystem over S3-compatible object storage."""

__version__ = "0.1.0"
