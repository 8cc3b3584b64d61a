"""The FUSE mount: pyfuse3 operations over the cluster client (ops.py) and
the ``objcache mount`` runner (mount.py)."""
