"""Raft consensus: a pure core (core.py), its log storage and an asyncio
driver. See docs/raft.md."""
