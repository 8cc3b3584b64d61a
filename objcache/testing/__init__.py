"""Test and benchmark support: real S3 servers on loopback, helpers."""
