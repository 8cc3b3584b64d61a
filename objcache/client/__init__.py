"""Python-side APIs: a cluster client and an fsspec filesystem."""
