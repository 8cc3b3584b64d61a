"""Where a cluster's files live in the bucket, and which file a user's path names.

A cluster serves one bucket and prefix (``objcache server --bucket
s3://BUCKET/PREFIX``): its root directory is the folder ``BUCKET/PREFIX``.
Users name files the way every object-store tool does, by their full
location ``BUCKET/PREFIX/KEY`` (s3fs, gcsfs and adlfs paths; ``s3://`` or
``objcache://`` in front is optional), so that switching the protocol is
the only change they make. ``ClusterRoot.relative`` turns such a location
into the path inside the cluster's namespace, and refuses every location the
cluster does not serve, naming both: a path is never quietly placed
somewhere else.

The folders above the root (the bucket itself, the prefix's parents) exist
for listing only: they show the next component toward the root and nothing
else, and nothing can be written there.
"""
from __future__ import annotations

from dataclasses import dataclass

ABOVE_ROOT = None       # ClusterRoot.relative's answer for a folder above the root


class OutsideCluster(ValueError):
    """A path the cluster does not serve: another bucket, or a key outside
    the cluster's prefix (or, for writes, a folder above the root)."""


def split_location(url: str) -> str:
    """``s3://B/P``, ``objcache://B/P``, ``/B/P/`` or ``B/P`` -> ``"B/P"``
    (no scheme, no leading or trailing ``/``)."""
    for scheme in ("s3://", "objcache://", "s3a://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
            break
    return url.strip("/")


@dataclass(frozen=True)
class ClusterRoot:
    """The cluster's bucket and key prefix (``""`` or ending with ``/``, as
    the S3 store normalises it)."""
    bucket: str
    prefix: str = ""

    @property
    def path(self) -> str:
        """The root as a location: ``"bucket"`` or ``"bucket/a/b"``."""
        return f"{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def url(self) -> str:
        return f"s3://{self.path}/"

    def relative(self, location: str) -> str | None:
        """The path inside the cluster of ``location`` (``""`` for the
        root, ``"a/b"`` below it); ABOVE_ROOT for a folder above the root;
        OutsideCluster for anything else."""
        loc = split_location(location)
        root = self.path
        if loc == root:
            return ""
        if loc.startswith(root + "/"):
            return loc[len(root) + 1:]
        if loc == "" or root.startswith(loc + "/"):
            return ABOVE_ROOT
        raise OutsideCluster(
            f"{location!r} is outside this cluster: it serves {self.url} "
            f"(paths look like {root}/KEY)")

    def location(self, relative: str) -> str:
        """The full location of a path inside the cluster."""
        return f"{self.path}/{relative}" if relative else self.path

    def below(self, location: str) -> str:
        """For a folder above the root: the next folder toward the root
        (``"b"`` above ``b/x/y`` -> ``"b/x"``)."""
        loc = split_location(location)
        rest = self.path[len(loc) + 1:] if loc else self.path
        head = rest.split("/", 1)[0]
        return f"{loc}/{head}" if loc else head
