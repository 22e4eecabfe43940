"""The read-only FUSE mount: the only layer that imports pyfuse3."""
