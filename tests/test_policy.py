"""The mount's signature policy and accessory tags in the tree model, with a fake source and
voucher (no mount, no network); the policy's decisions alone; the errno it ends in."""

from __future__ import annotations

import errno
import logging

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from galleryfs import digest as digests
from galleryfs import modelpack
from galleryfs.errors import NotFound, Unsigned
from galleryfs.modelpack import ChunkTable, Descriptor, Revision
from galleryfs.mount.config import MountConfig
from galleryfs.mount.operations import errno_for
from galleryfs.mount.tree import ROOT_INODE, Refused, Tree
from galleryfs.registry.client import ClientOptions
from galleryfs.trust.accessories import accessory_tags, is_accessory_tag
from galleryfs.trust.chunks import with_tables
from galleryfs.trust.keys import PublicKey
from galleryfs.trust.policy import Decision, Policy, Verdict

BIG = 9 << 20


def _revision(files: dict[str, int]) -> Revision:
    layers = [Descriptor(modelpack.layer_media_type("weight"), digests.of_bytes(p.encode()),
                         size, {modelpack.ANNOTATION_FILEPATH: p})
              for p, size in files.items()]
    config = Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(b"{}"), 2)
    body = modelpack.build_manifest(config, layers)
    return modelpack.parse_manifest(digests.of_bytes(body), body)


SIGNED = _revision({"w.bin": BIG, "config.json": 10})
UNSIGNED = _revision({"config.json": 11})
SIG = "sha256-" + SIGNED.digest.split(":")[1] + ".sig"
INDEX = "sha256-" + SIGNED.digest.split(":")[1]
TABLE = ChunkTable(4 << 20, bytes(range(32)) * 3)


class FakeSource:
    def __init__(self) -> None:
        self.tags_of = {"g/m": {"good": SIGNED, "bad": UNSIGNED, SIG: UNSIGNED,
                                INDEX: UNSIGNED, "also-bad": UNSIGNED}}
        self.signed: set[str] = {SIGNED.digest}
        self.tables: dict = {}
        self.vouched: list[str] = []
        self.manifests: list[str] = []

    async def catalog(self) -> list[str]:
        return sorted(self.tags_of)

    async def tags(self, repo: str) -> list[str]:
        return sorted(self.tags_of[repo])

    async def manifest(self, repo: str, reference: str) -> Revision:
        self.manifests.append(reference)
        for tag, rev in self.tags_of.get(repo, {}).items():
            if reference in (tag, rev.digest):
                return rev
        raise NotFound(reference)

    async def vouch(self, repo: str, revision: Revision) -> Verdict:
        self.vouched.append(revision.digest)
        await trio.lowlevel.checkpoint()
        if revision.digest in self.signed:
            return Verdict(signer="alice.pub", scheme="cosign", tables=self.tables)
        return Verdict(reason="no signature", tables=self.tables)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key() -> PublicKey:
    return PublicKey(ec.generate_private_key(ec.SECP256R1()).public_key(), "alice.pub")


def _tree(src: FakeSource, *, audit: bool = False, enforced: bool = True,
          clock: Clock | None = None) -> Tree:
    policy = Policy((_key(),), audit) if enforced else Policy()
    return Tree(src, "g/m", policy=policy, voucher=src, refresh=30.0,
                clock=clock or Clock())


async def _names(tree: Tree) -> list[str]:
    return [n for n, _ in await tree.listdir(ROOT_INODE)]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- accessories --------------------------------------------------------------------------


def test_accessory_tags() -> None:
    hexpart = "a" * 64
    for tag in (f"sha256-{hexpart}", f"sha256-{hexpart}.sig", f"sha256-{hexpart}.chunks",
                f"sha256-{hexpart}.att", f"sha256-{hexpart}.sbom"):
        assert is_accessory_tag(tag), tag
    for tag in ("latest", "sha256-abc.sig", f"sha256-{hexpart}x", f"sha256-{hexpart}.",
                f"sha256-{'A' * 64}.sig", f"sha512-{hexpart}.sig", f"v1-sha256-{hexpart}"):
        assert not is_accessory_tag(tag), tag
    tags = [f"sha256-{hexpart}.sig", f"sha256-{hexpart}", f"sha256-{'b' * 64}.sig", "latest",
            f"sha256-{hexpart}x"]
    assert accessory_tags(f"sha256:{hexpart}", tags) == [f"sha256-{hexpart}",
                                                          f"sha256-{hexpart}.sig"]


@pytest.mark.trio
async def test_accessory_tags_are_hidden_without_a_policy() -> None:
    src = FakeSource()
    tree = _tree(src, enforced=False)
    assert await _names(tree) == sorted(["also-bad", "bad", "good", SIGNED.digest,
                                         UNSIGNED.digest])
    for tag in (SIG, INDEX):
        with pytest.raises(NotFound):
            await tree.lookup(ROOT_INODE, tag)
    # Hidden before anything is fetched for them.
    assert SIG not in src.manifests and INDEX not in src.manifests
    assert src.vouched == []  # no policy: nobody asked


# ---- the policy ---------------------------------------------------------------------------


def test_policy_decisions() -> None:
    signed, unsigned = Verdict(signer="k", scheme="cosign"), Verdict(reason="none")
    assert Policy().decide(unsigned) is Decision.SHOW
    assert Policy().decide(None) is Decision.SHOW
    enforced = Policy((_key(),))
    assert enforced.decide(signed) is Decision.SHOW
    assert enforced.decide(unsigned) is Decision.REFUSE
    assert enforced.decide(None) is Decision.REFUSE
    audit = Policy((_key(),), audit=True)
    assert audit.decide(signed) is Decision.SHOW
    assert audit.decide(unsigned) is Decision.SHOW_WITH_WARNING


@pytest.mark.trio
async def test_unsigned_revisions_are_hidden_and_refused_by_digest(
        caplog: pytest.LogCaptureFixture) -> None:
    src = FakeSource()
    tree = _tree(src)
    with caplog.at_level(logging.WARNING, logger="galleryfs"):
        assert await _names(tree) == sorted(["good", SIGNED.digest])
        for tag in ("bad", "also-bad"):
            with pytest.raises(NotFound):
                await tree.lookup(ROOT_INODE, tag)
        for _ in range(3):
            with pytest.raises(Refused) as caught:
                await tree.lookup(ROOT_INODE, UNSIGNED.digest)
            assert errno_for(caught.value) == errno.EACCES
            assert "not signed by a trusted key (no signature)" in str(caught.value)
    # One warning for the revision, however often it is asked for.
    (warning,) = _warnings(caplog)
    assert UNSIGNED.digest in warning and "hidden and refused" in warning
    # One verdict per revision (the two unsigned tags share it), cached with the listing.
    assert sorted(src.vouched) == sorted([SIGNED.digest, UNSIGNED.digest])


@pytest.mark.trio
async def test_audit_shows_unsigned_revisions_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    src = FakeSource()
    tree = _tree(src, audit=True)
    with caplog.at_level(logging.WARNING, logger="galleryfs"):
        assert await _names(tree) == sorted(["also-bad", "bad", "good", SIGNED.digest,
                                             UNSIGNED.digest])
        rev = await tree.lookup(ROOT_INODE, UNSIGNED.digest)
        assert [n for n, _ in await tree.listdir(rev.inode)] == ["config.json"]
    (warning,) = _warnings(caplog)
    assert warning.startswith("audit: ") and UNSIGNED.digest in warning


@pytest.mark.trio
async def test_a_signature_added_later_shows_after_the_refresh_period() -> None:
    src = FakeSource()
    clock = Clock()
    tree = _tree(src, clock=clock)
    assert "bad" not in await _names(tree)
    src.signed.add(UNSIGNED.digest)
    clock.now += 10  # within --refresh: the verdict is kept with the listing
    assert "bad" not in await _names(tree)
    with pytest.raises(Refused):
        await tree.lookup(ROOT_INODE, UNSIGNED.digest)
    clock.now += 25
    assert "bad" in await _names(tree)
    assert (await tree.lookup(ROOT_INODE, UNSIGNED.digest)).digest == UNSIGNED.digest
    # A signed verdict is kept: later refreshes do not ask again.
    asked = len(src.vouched)
    clock.now += 100
    await _names(tree)
    assert len(src.vouched) == asked


@pytest.mark.trio
async def test_a_failed_lookup_is_not_cached_as_unsigned() -> None:
    from galleryfs.errors import RegistryUnavailable

    src = FakeSource()
    real = src.vouch

    async def down(repo: str, revision: Revision) -> Verdict:
        raise RegistryUnavailable("registry down")

    src.vouch = down  # type: ignore[method-assign]
    tree = _tree(src)
    with pytest.raises(RegistryUnavailable):
        await tree.lookup(ROOT_INODE, SIGNED.digest)
    src.vouch = real  # type: ignore[method-assign]
    assert (await tree.lookup(ROOT_INODE, SIGNED.digest)).digest == SIGNED.digest


@pytest.mark.trio
async def test_signed_tables_are_given_to_files_without_one() -> None:
    src = FakeSource()
    w = next(f for f in SIGNED.files if f.path == "w.bin")
    src.tables = {w.digest: (BIG, TABLE)}
    tree = _tree(src)
    rev = await tree.lookup(ROOT_INODE, SIGNED.digest)
    files = {n: tree.get(i).file for n, i in await tree.listdir(rev.inode)}
    assert files["w.bin"].table == TABLE  # type: ignore[union-attr]
    assert files["config.json"].table is None  # type: ignore[union-attr]


def test_with_tables_fills_only_what_fits_and_never_replaces() -> None:
    w = next(f for f in SIGNED.files if f.path == "w.bin")
    c = next(f for f in SIGNED.files if f.path == "config.json")
    # The wrong size for w.bin; a table for config.json that does not fit its 10 bytes.
    assert with_tables(SIGNED, {w.digest: (BIG + 1, TABLE), c.digest: (10, TABLE)}) == SIGNED
    own = ChunkTable(4 << 20, bytes(32) * 3)
    revision = with_tables(SIGNED, {w.digest: (BIG, own)})
    assert with_tables(revision, {w.digest: (BIG, TABLE)}).files == revision.files


def test_a_policy_needs_a_voucher() -> None:
    with pytest.raises(ValueError):
        Tree(FakeSource(), "g/m", policy=Policy((_key(),)))


def test_errno_of_unsigned() -> None:
    assert errno_for(Unsigned("harbor 412")) == errno.EACCES
    assert errno_for(Refused("policy")) == errno.EACCES


def test_mount_config_carries_keys_to_the_daemon(tmp_path) -> None:  # noqa: ANN001
    pem = _key().pem()
    config = MountConfig(source="127.0.0.1:5000/g", mountpoint=str(tmp_path),
                         options=ClientOptions(plain_http=True), cache_dir=str(tmp_path),
                         trusted_keys=[pem], audit=True)
    again = MountConfig.from_json(config.to_json())
    assert again.trusted_keys == [pem] and again.audit
    assert again.policy.enforced and again.policy.audit
    assert again.policy.keys[0].pem() == pem
    from galleryfs.errors import UsageError

    with pytest.raises(UsageError, match="--audit needs --require-signed-by"):
        MountConfig(source="127.0.0.1:5000/g", mountpoint=str(tmp_path),
                    options=ClientOptions(), cache_dir=str(tmp_path), audit=True)
    with pytest.raises(UsageError, match="not a PEM public key"):
        MountConfig(source="127.0.0.1:5000/g", mountpoint=str(tmp_path),
                    options=ClientOptions(), cache_dir=str(tmp_path), trusted_keys=["junk"])
