"""The node engine: a group's state machine with its side effects, the data
path (chunk reads and writes at their owners), write-back, and the node
process (docs/storage-engine.md)."""
