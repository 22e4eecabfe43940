"""Who vouches for a revision: signatures (cosign key-based, OpenSSF model-signing) and
signed chunk tables attached to revisions. Below the gallery and the mount, above the
registry client: both the CLI's `sign`/`verify` and the mount's policy use it."""
