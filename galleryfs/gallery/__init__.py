"""Gallery operations: push, pull, list, tag, copy, remove."""
