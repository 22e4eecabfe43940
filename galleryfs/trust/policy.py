"""The mount's signature policy, as pure decisions (no registry, no FUSE).

`--require-signed-by KEY` (repeatable): a revision is shown only when one of the keys
signed it (cosign, or model-signing's `model.sig`); its tags are hidden otherwise, and
opening it by digest is refused. `--audit`: shown anyway, with a warning.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..modelpack import ChunkTable
from .keys import PublicKey


@dataclass(frozen=True)
class Verdict:
    """What the registry says of one revision, checked against the trusted keys."""

    signer: str = ""  # the trusted key that signed it ("": none did)
    scheme: str = ""  # "cosign" or "model-signing"
    reason: str = ""  # why not, when no key did
    # Tables from a `.chunks` referrer a trusted key signed: layer digest -> (size, table).
    tables: Mapping[str, tuple[int, ChunkTable]] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        return bool(self.signer)


class Decision(enum.Enum):
    SHOW = "show"
    SHOW_WITH_WARNING = "show, with a warning"  # --audit
    REFUSE = "refuse"


@dataclass(frozen=True)
class Policy:
    keys: tuple[PublicKey, ...] = ()
    audit: bool = False

    @property
    def enforced(self) -> bool:
        return bool(self.keys)

    def decide(self, verdict: Verdict | None) -> Decision:
        if not self.enforced or verdict is not None and verdict.signed:
            return Decision.SHOW
        return Decision.SHOW_WITH_WARNING if self.audit else Decision.REFUSE
