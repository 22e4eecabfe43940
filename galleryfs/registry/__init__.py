"""The OCI distribution client: the only layer that speaks HTTP."""
