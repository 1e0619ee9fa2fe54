"""Checkpoint I/O: headers, lazy tensor reads, streaming shard writes, atomic outputs."""
