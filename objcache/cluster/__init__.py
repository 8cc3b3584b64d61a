"""Cluster membership and placement: the hash ring, membership state,
migration (see docs/storage-engine.md)."""
