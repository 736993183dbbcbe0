"""Life cycles: which of a request's blocks are live and which are stale, one kind per life cycle."""
