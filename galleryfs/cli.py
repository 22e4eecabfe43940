"""The `galleryfs` command line: parse, connect, call `gallery`, print."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from . import __version__, gallery
from .errors import GalleryError, Unsigned, UsageError, first_error
from .gallery.pushing import check_annotations, check_created
from .progress import Progress
from .reference import Reference, parse, parse_model
from .registry import credentials
from .registry.client import ClientOptions, RegistryClient
from .registry.credentials import Credentials

log = logging.getLogger("galleryfs")
T = TypeVar("T")


def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("registry connection")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    g.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for the registry's TLS")
    g.add_argument("--username", "-u", help="registry user name (with --password-stdin)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on an unresponsive registry after this long (default 30)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="log what happens, to stderr")
    return p


def build_parser() -> argparse.ArgumentParser:
    conn = _connection_parent()
    parser = argparse.ArgumentParser(
        prog="galleryfs",
        description="A model gallery in an OCI registry: push, pull, list, and mount models.",
        epilog="References look like HOST[:PORT]/GALLERY/MODEL[:TAG|@sha256:DIGEST].",
    )
    parser.add_argument("--version", action="version", version=f"galleryfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("push", parents=[conn], help="push a model directory as a revision")
    p.add_argument("directory", type=Path)
    p.add_argument("ref", metavar="REF", help="HOST/GALLERY/MODEL[:TAG] (tag defaults to latest)")
    p.add_argument("--annotation", "-a", action="append", default=[], metavar="KEY=VALUE",
                   help="annotate the revision (repeatable)")
    p.add_argument("--created", metavar="TIMESTAMP",
                   help="record a creation time (RFC 3339); off by default so pushes are reproducible")

    p = sub.add_parser("pull", parents=[conn], help="download a revision into a new directory")
    p.add_argument("ref", metavar="REF")
    p.add_argument("directory", type=Path)

    p = sub.add_parser("ls", parents=[conn], help="list galleries, models or revisions")
    p.add_argument("ref", metavar="HOST[/GALLERY[/MODEL]]")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("tag", parents=[conn], help="add tags to a revision")
    p.add_argument("ref", metavar="REF")
    p.add_argument("tags", nargs="+", metavar="NEWTAG")

    p = sub.add_parser("inspect", parents=[conn], help="show a revision as JSON")
    p.add_argument("ref", metavar="REF")

    p = sub.add_parser("rm", parents=[conn], help="remove a tag (REF:TAG) or a revision (REF@DIGEST)")
    p.add_argument("ref", metavar="REF")

    p = sub.add_parser("cp", parents=[conn], help="copy or promote a revision to another model or gallery")
    p.add_argument("source", metavar="SRC_REF")
    p.add_argument("target", metavar="DST_REF")

    p = sub.add_parser("sign", parents=[conn],
                       help="sign a revision (cosign format, stored beside it as sha256-<hex>.sig)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="EC P-256 private key (PEM, unencrypted)")

    p = sub.add_parser("verify", parents=[conn],
                       help="check that a key signed exactly this revision (exit 0 if so, 1 if not)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--key", required=True, action="append", metavar="PUBLIC.pem",
                   help="trusted public key (PEM; repeatable: any one of them will do)")

    p = sub.add_parser("index", parents=[conn],
                       help="attach signed chunk tables to an existing revision")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="EC P-256 private key that signs the tables")

    p = sub.add_parser("login", parents=[conn], help="store credentials for a registry (mode 0600)")
    p.add_argument("host", metavar="HOST")

    p = sub.add_parser("logout", parents=[conn], help="forget stored credentials for a registry")
    p.add_argument("host", metavar="HOST")

    p = sub.add_parser("mount", parents=[conn], help="mount a registry as a read-only file system")
    p.add_argument("source", metavar="HOST[/GALLERY[/MODEL]]")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--cache-dir", metavar="DIR", help="disk cache (default ~/.cache/galleryfs)")
    p.add_argument("--cache-size", default="10G", metavar="SIZE",
                   help="disk cache bound (default 10G; 0: no disk cache)")
    p.add_argument("--refresh", type=float, default=30.0, metavar="SECONDS",
                   help="how long listings and tags are trusted (default 30)")
    p.add_argument("--chunk-size", default="4M", metavar="SIZE", help="range request size (default 4M)")
    p.add_argument("--require-signed-by", action="append", default=[], metavar="PUBLIC.pem",
                   help="show only revisions this key signed (repeatable: any one of them)")
    p.add_argument("--audit", action="store_true",
                   help="with --require-signed-by: show unsigned revisions, with a warning")
    p.add_argument("--verify", choices=("strict", "end"), default="strict",
                   help="files without a chunk table: verify the whole blob before serving "
                        "it (strict, default), or serve unverified bytes (end: weaker)")
    p.add_argument("--max-inodes", type=int, default=100_000, metavar="N",
                   help="names the daemon keeps in memory (default 100000; see README)")

    p = sub.add_parser("unmount", help="unmount a galleryfs mount")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--lazy", action="store_true",
                   help="detach now even if files are open; unmount once they are closed")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_size(text: str, *, zero: bool = False) -> int:
    """Bytes of a size such as 512M or 10G; 0 only when `zero` allows it."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise UsageError(f"invalid size {text!r}: use e.g. 512M or 10G") from None
    if not math.isfinite(value) or value * units[unit] >= 1 << 63:
        raise UsageError(f"invalid size {text!r}: use e.g. 512M or 10G")
    if value < 0 or value == 0 and not zero:
        raise UsageError(f"invalid size {text!r}: must be positive")
    return int(value * units[unit])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _credentials(args: argparse.Namespace, host: str) -> Credentials | None:
    if args.password_stdin:
        if not args.username:
            raise UsageError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("no password on standard input")
        return Credentials(args.username, password)
    if args.username:
        raise UsageError("--username needs --password-stdin (passwords are never taken as arguments)")
    return credentials.lookup(host)


def options_for(args: argparse.Namespace, host: str, creds: Credentials | None = None) -> ClientOptions:
    if args.ca_file and not Path(args.ca_file).is_file():
        raise UsageError(f"--ca-file {args.ca_file}: no such file")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return ClientOptions(plain_http=args.plain_http, ca_file=args.ca_file,
                         credentials=creds if creds is not None else _credentials(args, host),
                         timeout=args.timeout)


def _progress(args: argparse.Namespace) -> gallery.ProgressFactory:
    return lambda total, label: Progress(total, label, quiet=args.quiet)


async def _with_client(args: argparse.Namespace, ref: Reference,
                       fn: Callable[[RegistryClient], Awaitable[T]]) -> T:
    async with RegistryClient(ref.host, options_for(args, ref.host)) as client:
        return await fn(client)


def _annotations(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--annotation {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


# ---- commands ---------------------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref)
    annotations = _annotations(args.annotation)
    # Before a password is read or the registry is asked anything.
    check_annotations(annotations)
    if args.created is not None:
        check_created(args.created)
    result = trio.run(_with_client, args, ref, lambda c: gallery.push(
        c, args.directory, ref, annotations=annotations, created=args.created,
        progress=_progress(args)))
    print(f"pushed {ref.host}/{ref.repository}@{result.digest} as :{result.tags[0]}")
    print(f"  {len(result.uploaded)} uploaded ({human(result.bytes_uploaded)}), "
          f"{len(result.mounted)} mounted from another model, {len(result.existing)} already there")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref)
    revision = trio.run(_with_client, args, ref, lambda c: gallery.pull(
        c, ref, args.directory, progress=_progress(args)))
    print(f"pulled {ref.repository}@{revision.digest} into {args.directory} "
          f"({len(revision.files)} files, {human(revision.size)})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    ref = parse(args.ref)
    if ref.tag or ref.digest:
        raise UsageError("ls takes HOST, HOST/GALLERY or HOST/GALLERY/MODEL (no tag or digest)")

    async def run(client: RegistryClient) -> object:
        if not ref.repository:
            return ("galleries", await gallery.list_galleries(client))
        if "/" in ref.repository:
            try:
                return ("revisions", await gallery.list_revisions(client, ref.repository))
            except GalleryError as exc:
                if getattr(exc, "status", None) != 404:
                    raise
        models = await gallery.list_models(client, ref.repository)
        if not models:
            raise GalleryError(f"{ref}: no such gallery or model")
        return ("models", models)

    kind, data = trio.run(_with_client, args, ref, run)  # type: ignore[misc]
    if kind == "galleries":
        rows = [{"gallery": g, "models": n} for g, n in data.items()]
        _table(args, rows, ["gallery", "models"])
    elif kind == "models":
        rows = [{"model": m.split("/", 1)[1]} for m in data]
        _table(args, rows, ["model"])
    else:
        rows = [{"digest": r.digest, "tags": ",".join(r.tags), "size": r.size,
                 "files": r.files, "created": r.created or "-"} for r in data]
        if args.json:
            _table(args, rows, [])
        else:
            _table(args, [{**r, "size": human(r["size"])} for r in rows],
                   ["digest", "tags", "size", "files", "created"])
    return 0


def _table(args: argparse.Namespace, rows: list[dict], columns: list[str]) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())


def cmd_tag(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref)
    digest = trio.run(_with_client, args, ref, lambda c: gallery.tag(c, ref, args.tags))
    print(f"tagged {ref.repository}@{digest} as {', '.join(args.tags)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref)
    info = trio.run(_with_client, args, ref, lambda c: gallery.inspect(c, ref))
    print(json.dumps(info, indent=2))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref)
    message = trio.run(_with_client, args, ref, lambda c: gallery.remove(c, ref))
    print(f"{ref}: {message}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = parse_model(args.source), parse_model(args.target)

    async def run() -> str:
        async with RegistryClient(src.host, options_for(args, src.host)) as s:
            if dst.host == src.host:
                return await gallery.copy(s, src, s, dst, _progress(args))
            async with RegistryClient(dst.host, options_for(args, dst.host)) as d:
                return await gallery.copy(s, src, d, dst, _progress(args))

    digest = trio.run(run)
    print(f"copied {src} to {dst.host}/{dst.repository}:{dst.tag or src.tag or gallery.DEFAULT_TAG} "
          f"({digest})")
    return 0


# The trust commands import `cryptography` when they run: the others need not load it.


def cmd_sign(args: argparse.Namespace) -> int:
    from .trust import cosign
    from .trust.keys import load_private

    ref = parse_model(args.ref)
    key = load_private(args.key)  # before a password is read or a registry contacted

    async def run(client: RegistryClient) -> cosign.Signed:
        digest = (await client.get_manifest(ref.repository, ref.version or gallery.DEFAULT_TAG)
                  ).digest
        return await cosign.sign(client, ref.repository, digest, key)

    signed = trio.run(_with_client, args, ref, run)
    state = "signed" if signed.added else "already signed by this key"
    print(f"{state}: {ref.host}/{ref.repository}@{signed.digest}")
    print(f"  signature stored as {ref.host}/{ref.repository}:{signed.tag}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .trust.keys import load_public
    from .trust.vouch import verify_reference

    ref = parse_model(args.ref)
    keys = [load_public(k) for k in args.key]
    digest, verdict = trio.run(_with_client, args, ref, lambda c: verify_reference(
        c, ref.repository, ref.version or gallery.DEFAULT_TAG, keys))
    if not verdict.signed:
        raise Unsigned(f"{ref.host}/{ref.repository}@{digest} is not signed by this key: "
                       f"{verdict.reason}")
    print(f"verified: {ref.host}/{ref.repository}@{digest} is signed by {verdict.signer} "
          f"({verdict.scheme})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .trust import chunks
    from .trust.keys import load_private

    ref = parse_model(args.ref)
    key = load_private(args.key)
    result = trio.run(_with_client, args, ref, lambda c: chunks.index(
        c, ref.repository, ref.version or gallery.DEFAULT_TAG, key))
    where = f"{ref.host}/{ref.repository}"
    if result.signature is None:
        print(f"{where}@{result.revision}: no file needs a chunk table (each has one, or is "
              "one chunk or less)")
        return 0
    print(f"indexed {where}@{result.revision}: chunk tables for {result.files} files")
    print(f"  stored as {where}:{result.tag} ({result.referrer})")
    print(f"  signed: {where}:{result.signature.tag}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    ref = parse(args.host)
    if ref.repository:
        raise UsageError("login takes a registry host, e.g. registry.example.com")
    if args.password_stdin:
        creds = _credentials(args, ref.host)
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for a password: use --username and --password-stdin")
        user = args.username or input("Username: ")
        creds = Credentials(user, getpass.getpass("Password: "))
    assert creds is not None
    # Check the credentials before storing them: a typo should not be saved.
    trio.run(_ping, options_for(args, ref.host, creds), ref.host)
    path = credentials.save(ref.host, creds)
    print(f"login succeeded; credentials for {ref.host} stored in {path}")
    return 0


async def _ping(options: ClientOptions, host: str) -> None:
    async with RegistryClient(host, options) as client:
        await client.ping()
        # A registry with token auth answers /v2/ only once a token was granted.


def cmd_logout(args: argparse.Namespace) -> int:
    ref = parse(args.host)
    if credentials.remove(ref.host):
        print(f"removed credentials for {ref.host}")
    else:
        print(f"no stored credentials for {ref.host}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    # Before anything else (a password read, a registry contacted): a mount with a plain
    # pyfuse3 fails with one line saying what to install. pyfuse3 is imported only here.
    from .mount.requirements import require_patched_pyfuse3

    require_patched_pyfuse3()
    from .mount.config import MountConfig, default_cache_dir
    from .mount.daemon import mount_main
    from .trust.keys import load_public

    keys = [load_public(k).pem() for k in args.require_signed_by]
    config = MountConfig(
        source=args.source, mountpoint=str(args.mountpoint),
        options=options_for(args, parse(args.source).host),
        cache_dir=args.cache_dir or default_cache_dir(),
        cache_size=parse_size(args.cache_size, zero=True), refresh=args.refresh,
        chunk_size=parse_size(args.chunk_size), debug=args.debug, verify=args.verify,
        trusted_keys=keys, audit=args.audit, max_inodes=args.max_inodes,
    )
    return mount_main(config, foreground=args.foreground)


def cmd_unmount(args: argparse.Namespace) -> int:
    from .mount.unmount import unmount_main

    return unmount_main(str(args.mountpoint), lazy=args.lazy)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "push": cmd_push, "pull": cmd_pull, "ls": cmd_ls, "tag": cmd_tag, "inspect": cmd_inspect,
    "rm": cmd_rm, "cp": cmd_cp, "sign": cmd_sign, "verify": cmd_verify, "index": cmd_index,
    "login": cmd_login, "logout": cmd_logout,
    "mount": cmd_mount, "unmount": cmd_unmount,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="galleryfs: %(levelname)s: %(name)s: %(message)s" if args.debug
        else "galleryfs: %(levelname)s: %(message)s",
    )
    if not args.debug:
        # httpx logs every request at INFO, with URLs: keep them out unless asked for.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        try:
            return COMMANDS[args.command](args)
        except BaseExceptionGroup as group:
            # Concurrent transfers run in trio nurseries, which group their failures; the
            # user needs the first real cause, once.
            raise first_error(group) from None
    except GalleryError as exc:
        print(f"galleryfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("galleryfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A local file problem (disk full, permission denied) is the user's to fix, not a crash.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"galleryfs: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1

