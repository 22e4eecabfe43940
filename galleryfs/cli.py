"""The `galleryfs` command line: parse, connect, call `gallery`, print."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from . import __version__, gallery, modelpack
from .errors import GalleryError, Unsigned, UsageError, first_error
from .gallery.pushing import check_annotations, check_created
from .progress import Progress
from .reference import Reference, parse, parse_model
from .registry import credentials
from .registry.client import ClientOptions, RegistryClient
from .registry.credentials import Credentials
from .registry.mirrors import check_url

log = logging.getLogger("galleryfs")
T = TypeVar("T")


def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("registry connection")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    g.add_argument("--ca-file", metavar="PEM", help="trust this CA bundle for the registry's TLS")
    g.add_argument("--username", "-u",
                   help="registry user name (with --password-stdin or --password-file)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    g.add_argument("--password-file", metavar="PATH",
                   help="read the password from this file, again whenever a new token is "
                        "needed (rotate it without a remount)")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on an unresponsive registry after this long (default 30)")
    g.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="read manifests by digest and blobs from this pull-through cache or "
                        "mirror first, e.g. http://10.0.0.5:5000 (repeatable, tried in order; "
                        "tags always come from the registry; no credentials are sent to it)")
    g.add_argument("--proxy", metavar="URL",
                   help="send all registry traffic through this HTTP proxy "
                        "(e.g. Dragonfly's dfdaemon), e.g. http://127.0.0.1:4001")
    return p


def _debug_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="log what happens, to stderr")
    return p


def _quiet_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing (errors still go to stderr)")
    p.set_defaults(json=False)
    return p


def _output_parent(quiet: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output").add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the result as JSON, nothing else")
    g.add_argument("--quiet", "-q", action="store_true", help=quiet)
    return p


# name -> (one-line help, description, examples); every subcommand has all three.
HELP: dict[str, tuple[str, str, list[str]]] = {
    "push": ("push a model directory as a revision",
             "Push every file of DIRECTORY as one revision (a ModelPack manifest) and tag it. "
             "Files the registry already has are not sent again; the same directory gives the "
             "same revision digest.",
             ["galleryfs push ./all-MiniLM-L6-v2 registry.example.com/team-a/minilm:v1",
              "galleryfs push ./llama reg.example.com/team-a/llama:v2 -a owner=nlp --quiet"]),
    "pull": ("download a revision into a new directory",
             "Download every file of a revision into DIRECTORY, which must not exist or be "
             "empty. Every byte is checked against its digest; nothing is left behind on "
             "failure.",
             ["galleryfs pull registry.example.com/team-a/minilm:v1 ./minilm",
              "galleryfs pull registry.example.com/team-a/minilm@sha256:... ./minilm --json"]),
    "ls": ("list galleries, models or revisions",
           "List the galleries of a registry (HOST), the models of a gallery (HOST/GALLERY) "
           "or the revisions of a model (HOST/GALLERY/MODEL) with their tags, size, files "
           "and creation time.",
           ["galleryfs ls registry.example.com",
            "galleryfs ls registry.example.com/team-a/minilm --json"]),
    "tag": ("add tags to a revision",
            "Give the revision REF names more tags (NEWTAG, in the same model).",
            ["galleryfs tag registry.example.com/team-a/minilm:v1 prod stable"]),
    "inspect": ("show a revision as JSON",
                "Print a revision's manifest, config and files (format, architecture, dtypes, "
                "parameters, chunk tables) as JSON.",
                ["galleryfs inspect registry.example.com/team-a/minilm:prod"]),
    "rm": ("remove a tag (REF:TAG) or a revision (REF@DIGEST)",
           "Remove a tag, or a whole revision with what is stored beside it (signatures, "
           "chunk tables). Blobs are freed by the registry's garbage collection.",
           ["galleryfs rm registry.example.com/team-a/minilm:old",
            "galleryfs rm registry.example.com/team-a/minilm@sha256:..."]),
    "cp": ("copy or promote a revision to another model or gallery",
           "Copy the revision SRC_REF to DST_REF (another model, gallery or registry). The "
           "digest stays the same; blobs the target has are not sent again.",
           ["galleryfs cp registry.example.com/team-a/minilm:v1 registry.example.com/prod/minilm:v1"]),
    "sign": ("sign a revision (cosign format, stored beside it as sha256-<hex>.sig)",
             "Sign the revision's manifest digest with an EC P-256 key, in cosign's "
             "key-based format, so cosign, Harbor and `galleryfs verify` see it.",
             ["galleryfs sign registry.example.com/team-a/minilm:v1 --key cosign.key"]),
    "verify": ("check that a key signed exactly this revision (exit 0 if so, 1 if not)",
               "Check offline that one of the keys signed exactly this revision: a cosign "
               "signature beside it or an OpenSSF model-signing model.sig inside it.",
               ["galleryfs verify registry.example.com/team-a/minilm:v1 --key cosign.pub"]),
    "index": ("attach signed chunk tables to an existing revision",
              "Compute the chunk tables of a revision pushed by another tool and store them "
              "beside it, signed; a mount trusting the key verifies every chunk with them.",
              ["galleryfs index registry.example.com/other/model:v1 --key cosign.key"]),
    "login": ("store credentials for a registry (mode 0600)",
              "Check a user name and password against the registry and store them for later "
              "commands and mounts.",
              ["galleryfs login registry.example.com",
               "echo \"$PASSWORD\" | galleryfs login registry.example.com -u robot --password-stdin"]),
    "logout": ("forget stored credentials for a registry",
               "Remove the credentials `galleryfs login` stored for HOST.",
               ["galleryfs logout registry.example.com"]),
    "mount": ("mount a registry as a read-only file system",
              "Show the galleries, models, revisions (by tag and digest) and files of a "
              "registry as a read-only directory tree. File bytes are fetched lazily, "
              "verified, and cached in memory and on disk.",
              ["galleryfs mount registry.example.com /mnt/models",
               "galleryfs mount registry.example.com/team-a /mnt/team-a --cache-size 50G"]),
    "unmount": ("unmount a galleryfs mount",
                "Write what the disk cache is owed, then unmount.",
                ["galleryfs unmount /mnt/models"]),
    "warm": ("fill a mount's disk cache with files ahead of need",
             "Fetch, verify and write to the mount's disk cache every file named or under a "
             "named folder (a revision, a model, a gallery), so that reading them later "
             "needs no network. Files already cached cost nothing.",
             ["galleryfs warm /mnt/models/team-a/llama/v1",
              "galleryfs warm /mnt/models/team-a --jobs 8 --json"]),
    "stats": ("show a mount's counters",
              "Print the counters of a running mount: bytes and requests sent to the "
              "registry, cache hits, verified chunks and failures, open files, inodes.",
              ["galleryfs stats /mnt/models", "galleryfs stats /mnt/models --json"]),
    "doctor": ("check that this machine (and a registry) can run galleryfs",
               "Check /dev/fuse, fusermount3, the kernel's FUSE, galleryfs's pyfuse3 and, "
               "given a registry, that it answers, its TLS, the credentials and the clock. "
               "Says what to fix; exit 1 when something fails.",
               ["galleryfs doctor", "galleryfs doctor registry.example.com"]),
}


def _add(sub: argparse._SubParsersAction, name: str, *parents: argparse.ArgumentParser
         ) -> argparse.ArgumentParser:
    short, description, examples = HELP[name]
    return sub.add_parser(
        name, parents=list(parents), help=short, description=description,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    conn, debug, quiet = _connection_parent(), _debug_parent(), _quiet_parent()
    parser = argparse.ArgumentParser(
        prog="galleryfs",
        description="A model gallery in an OCI registry: push, pull, list, and mount models.",
        epilog="References look like HOST[:PORT]/GALLERY/MODEL[:TAG|@sha256:DIGEST].",
    )
    parser.add_argument("--version", action="version", version=f"galleryfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(sub, "push", conn, debug, _output_parent("print only the revision digest"))
    p.add_argument("directory", type=Path, help="the model directory (every file in it)")
    p.add_argument("ref", metavar="REF", help="HOST/GALLERY/MODEL[:TAG] (tag defaults to latest)")
    p.add_argument("--annotation", "-a", action="append", default=[], metavar="KEY=VALUE",
                   help="annotate the revision (repeatable)")
    p.add_argument("--created", metavar="TIMESTAMP",
                   help="record a creation time (RFC 3339); off by default so pushes are reproducible")
    p.add_argument("--media-types", choices=("cncf", "cnai"), default="cncf",
                   help="ModelPack's names (cncf, default), or the older vnd.cnai ones that "
                        "Harbor 2.13-2.15 show as models (cnai)")

    p = _add(sub, "pull", conn, debug, _output_parent("print nothing"))
    p.add_argument("ref", metavar="REF", help="HOST/GALLERY/MODEL[:TAG|@DIGEST]")
    p.add_argument("directory", type=Path, help="where to put the files (must not exist, or be empty)")

    p = _add(sub, "ls", conn, debug, _output_parent("print only the first column"))
    p.add_argument("ref", metavar="HOST[/GALLERY[/MODEL]]", help="what to list")

    p = _add(sub, "tag", conn, debug, _output_parent("print nothing"))
    p.add_argument("ref", metavar="REF", help="the revision, by tag or digest")
    p.add_argument("tags", nargs="+", metavar="NEWTAG", help="tags to add")

    p = _add(sub, "inspect", conn, debug)
    p.add_argument("ref", metavar="REF", help="the revision, by tag or digest")

    p = _add(sub, "rm", conn, debug, quiet)
    p.add_argument("ref", metavar="REF", help="REF:TAG (a tag) or REF@DIGEST (a revision)")

    p = _add(sub, "cp", conn, debug, _output_parent("print only the revision digest"))
    p.add_argument("source", metavar="SRC_REF", help="the revision to copy")
    p.add_argument("target", metavar="DST_REF", help="where to: HOST/GALLERY/MODEL[:TAG]")

    p = _add(sub, "sign", conn, debug, quiet)
    p.add_argument("ref", metavar="REF", help="the revision, by tag or digest")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="EC P-256 private key (PEM, unencrypted)")

    p = _add(sub, "verify", conn, debug, quiet)
    p.add_argument("ref", metavar="REF", help="the revision, by tag or digest")
    p.add_argument("--key", required=True, action="append", metavar="PUBLIC.pem",
                   help="trusted public key (PEM; repeatable: any one of them will do)")

    p = _add(sub, "index", conn, debug, quiet)
    p.add_argument("ref", metavar="REF", help="the revision, by tag or digest")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="EC P-256 private key that signs the tables")

    p = _add(sub, "login", conn, debug)
    p.add_argument("host", metavar="HOST", help="the registry, e.g. registry.example.com")

    p = _add(sub, "logout", debug)
    p.add_argument("host", metavar="HOST", help="the registry, e.g. registry.example.com")

    p = _add(sub, "mount", conn, debug)
    p.add_argument("source", metavar="HOST[/GALLERY[/MODEL]]", help="what the mount shows")
    p.add_argument("mountpoint", type=Path, help="an existing empty directory")
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
    g = p.add_argument_group("who may read")
    g.add_argument("--allow-other", action="store_true",
                   help="let other local users read (as the modes allow; non-root needs "
                        "user_allow_other in /etc/fuse.conf)")
    g.add_argument("--uid", type=int, metavar="UID", help="owner shown (default: you)")
    g.add_argument("--gid", type=int, metavar="GID", help="group shown (default: yours)")
    g.add_argument("--umask", type=_octal, default=0o022, metavar="MODE",
                   help="mode bits taken away (default 022: everyone may read)")

    p = _add(sub, "unmount", debug)
    p.add_argument("mountpoint", type=Path, help="where galleryfs is mounted")
    p.add_argument("--lazy", action="store_true",
                   help="detach now even if files are open; unmount once they are closed")

    p = _add(sub, "warm", debug)
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders in a galleryfs mount")
    p.add_argument("--jobs", "-j", type=int, default=4, metavar="N",
                   help="files warmed at once (default 4)")
    g = p.add_argument_group("output").add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")

    p = _add(sub, "stats", debug)
    p.add_argument("mountpoint", type=Path, help="where galleryfs is mounted")
    p.add_argument("--json", action="store_true", help="print the counters as JSON")

    p = _add(sub, "doctor", conn, debug)
    p.add_argument("ref", metavar="HOST[/...]", nargs="?",
                   help="also check this registry (reachability, TLS, credentials, clock)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    return parser


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 022") from None


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
    if args.password_file:
        if args.password_stdin:
            raise UsageError("--password-file and --password-stdin: choose one")
        if not args.username:
            raise UsageError("--password-file needs --username")
        path = str(Path(args.password_file).absolute())  # the mount daemon runs elsewhere
        try:
            password = credentials.read_password_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--password-file {args.password_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if not password:
            raise UsageError(f"--password-file {args.password_file}: no password in it")
        return Credentials(args.username, password, password_file=path)
    if args.password_stdin:
        if not args.username:
            raise UsageError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("no password on standard input")
        return Credentials(args.username, password)
    if args.username:
        raise UsageError("--username needs --password-stdin or --password-file "
                         "(passwords are never taken as arguments)")
    return credentials.lookup(host)


MAX_TIMEOUT = 1e6


def options_for(args: argparse.Namespace, host: str, creds: Credentials | None = None) -> ClientOptions:
    if args.ca_file and not Path(args.ca_file).is_file():
        raise UsageError(f"--ca-file {args.ca_file}: no such file")
    # `not ... <= MAX_TIMEOUT` also refuses NaN (a trio deadline cannot be NaN), and a
    # bound keeps the direct reads' socket timeout within what the platform takes.
    if not 0 < args.timeout <= MAX_TIMEOUT:
        raise UsageError(f"--timeout must be positive, at most {MAX_TIMEOUT:g} seconds")
    mirrors = tuple(check_url(url, "--mirror") for url in args.mirror)
    proxy = check_url(args.proxy, "--proxy") if args.proxy is not None else None
    return ClientOptions(plain_http=args.plain_http, ca_file=args.ca_file,
                         credentials=creds if creds is not None else _credentials(args, host),
                         timeout=args.timeout, mirrors=mirrors, proxy=proxy)


def _progress(args: argparse.Namespace) -> gallery.ProgressFactory:
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    return lambda total, label: Progress(total, label, quiet=quiet)


def _emit(args: argparse.Namespace, result: dict[str, object], quiet: str | None,
          text: list[str]) -> None:
    """One result three ways: --json (the dict), --quiet (one value or nothing), or text."""
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.quiet:
        if quiet is not None:
            print(quiet)
    else:
        print("\n".join(text))


async def _with_client(args: argparse.Namespace, ref: Reference,
                       fn: Callable[[RegistryClient], Awaitable[T]],
                       creds: Credentials | None = None) -> T:
    async with RegistryClient(ref.host, options_for(args, ref.host, creds)) as client:
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
        progress=_progress(args), names=modelpack.NAMES[args.media_types]))
    _emit(args, {"reference": f"{ref.host}/{ref.repository}", "digest": result.digest,
                 "tags": list(result.tags), "uploaded": len(result.uploaded),
                 "uploadedBytes": result.bytes_uploaded, "mounted": len(result.mounted),
                 "existing": len(result.existing)}, result.digest,
          [f"pushed {ref.host}/{ref.repository}@{result.digest} as :{result.tags[0]}",
           f"  {len(result.uploaded)} uploaded ({human(result.bytes_uploaded)}), "
           f"{len(result.mounted)} mounted from another model, {len(result.existing)} already there"])
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref, root=True)
    revision = trio.run(_with_client, args, ref, lambda c: gallery.pull(
        c, ref, args.directory, progress=_progress(args)))
    _emit(args, {"reference": f"{ref.host}/{ref.repository}", "digest": revision.digest,
                 "directory": str(args.directory), "files": len(revision.files),
                 "size": revision.size}, None,
          [f"pulled {ref.repository}@{revision.digest} into {args.directory} "
           f"({len(revision.files)} files, {human(revision.size)})"])
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    ref = parse(args.ref)
    if ref.tag or ref.digest:
        raise UsageError("ls takes HOST, HOST/GALLERY or HOST/GALLERY/MODEL (no tag or digest)")

    async def run(client: RegistryClient) -> object:
        if not ref.repository:
            return ("galleries", (await gallery.list_galleries(client),
                                  await gallery.list_root_models(client)))
        if "/" in ref.repository:
            try:
                return ("revisions", await gallery.list_revisions(client, ref.repository))
            except GalleryError as exc:
                if getattr(exc, "status", None) != 404:
                    raise
        models = await gallery.list_models(client, ref.repository)
        if models:
            return ("models", models)
        try:  # a model at the registry's root: HOST/model
            return ("revisions", await gallery.list_revisions(client, ref.repository))
        except GalleryError as exc:
            if getattr(exc, "status", None) != 404:
                raise
        raise GalleryError(f"{ref}: no such gallery or model")

    kind, data = trio.run(_with_client, args, ref, run)  # type: ignore[misc]
    if kind == "galleries":
        galleries, root = data
        rows = [{"gallery": g, "models": n} for g, n in galleries.items()]
        if args.json:
            # Models at the registry's root belong to no gallery.
            _table(args, rows + [{"gallery": None, "model": m} for m in root], [])
        else:
            _table(args, rows, ["gallery", "models"])
            if root and not args.quiet:  # --quiet: galleries' names only, for scripts
                print(f"models outside any gallery: {', '.join(root)}")
    elif kind == "models":
        rows = [{"model": m.split("/", 1)[1]} for m in data]
        _table(args, rows, ["model"])
    else:
        rows = [{"digest": r.digest, "tags": list(r.tags), "size": r.size,
                 "files": r.files, "created": r.created or None} for r in data]
        if args.json:
            _table(args, rows, [])
        else:
            _table(args, [{**r, "size": human(r["size"]), "tags": ",".join(r["tags"]) or "-",
                           "created": r["created"] or "-"} for r in rows],
                   ["digest", "tags", "size", "files", "created"])
    return 0


def _table(args: argparse.Namespace, rows: list[dict], columns: list[str]) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if args.quiet:
        for r in rows:
            print(r[columns[0]])
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
    _emit(args, {"reference": f"{ref.host}/{ref.repository}", "digest": digest,
                 "tags": list(args.tags)}, None,
          [f"tagged {ref.repository}@{digest} as {', '.join(args.tags)}"])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref, root=True)
    info = trio.run(_with_client, args, ref, lambda c: gallery.inspect(c, ref))
    print(json.dumps(info, indent=2))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    ref = parse_model(args.ref)
    message = trio.run(_with_client, args, ref, lambda c: gallery.remove(c, ref))
    _emit(args, {}, None, [f"{ref}: {message}"])
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = parse_model(args.source, root=True), parse_model(args.target)

    async def run() -> str:
        async with RegistryClient(src.host, options_for(args, src.host)) as s:
            if dst.host == src.host:
                return await gallery.copy(s, src, s, dst, _progress(args))
            async with RegistryClient(dst.host, options_for(args, dst.host)) as d:
                return await gallery.copy(s, src, d, dst, _progress(args))

    digest = trio.run(run)
    tag = dst.tag or src.tag or gallery.DEFAULT_TAG
    _emit(args, {"source": str(src), "target": f"{dst.host}/{dst.repository}", "tag": tag,
                 "digest": digest}, digest,
          [f"copied {src} to {dst.host}/{dst.repository}:{tag} ({digest})"])
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
    _emit(args, {}, None, [f"{state}: {ref.host}/{ref.repository}@{signed.digest}",
                           f"  signature stored as {ref.host}/{ref.repository}:{signed.tag}"])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .trust.keys import load_public
    from .trust.vouch import verify_reference

    ref = parse_model(args.ref, root=True)
    keys = [load_public(k) for k in args.key]
    digest, verdict = trio.run(_with_client, args, ref, lambda c: verify_reference(
        c, ref.repository, ref.version or gallery.DEFAULT_TAG, keys))
    if not verdict.signed:
        raise Unsigned(f"{ref.host}/{ref.repository}@{digest} is not signed by this key: "
                       f"{verdict.reason}")
    _emit(args, {}, None, [f"verified: {ref.host}/{ref.repository}@{digest} is signed by "
                           f"{verdict.signer} ({verdict.scheme})"])
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
        _emit(args, {}, None, [f"{where}@{result.revision}: no file needs a chunk table (each "
                               "has one, or is one chunk or less)"])
        return 0
    _emit(args, {}, None, [f"indexed {where}@{result.revision}: chunk tables for {result.files} files",
                           f"  stored as {where}:{result.tag} ({result.referrer})",
                           f"  signed: {where}:{result.signature.tag}"])
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    ref = parse(args.host)
    if ref.repository:
        raise UsageError("login takes a registry host, e.g. registry.example.com")
    if args.password_stdin or args.password_file:
        creds = _credentials(args, ref.host)
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for a password: use --username and --password-stdin")
        user = args.username or input("Username: ")
        creds = Credentials(user, getpass.getpass("Password: "))
    assert creds is not None
    # Check the credentials before storing them: a typo should not be saved.
    trio.run(_ping, options_for(args, ref.host, creds), ref.host)
    path = credentials.save(ref.host, Credentials(creds.username, creds.password))
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
        allow_other=args.allow_other, uid=args.uid, gid=args.gid, umask=args.umask,
    )
    return mount_main(config, foreground=args.foreground)


def cmd_warm(args: argparse.Namespace) -> int:
    from .mount.warm import check_room, files_under, warm

    if not 1 <= args.jobs <= 64:
        raise UsageError("--jobs must be between 1 and 64")
    files = files_under(args.paths)
    check_room(files)
    progress = Progress(sum(size for _, size in files), "warm",
                        quiet=args.quiet or args.json)
    try:
        summary = warm(files, args.jobs, progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({"files": summary.files, "bytes": summary.bytes,
                          "fetchedBytes": summary.fetched_bytes,
                          "cachedChunks": summary.cached_chunks, "failed": summary.failed},
                         indent=2))
    elif not args.quiet:
        print(f"warmed {summary.files} files ({human(summary.bytes)}): "
              f"{human(summary.fetched_bytes)} fetched from the registry, "
              f"{summary.cached_chunks} chunks already cached")
    for failure in summary.failed:
        print(f"galleryfs: error: {failure}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_unmount(args: argparse.Namespace) -> int:
    from .mount.unmount import unmount_main

    return unmount_main(str(args.mountpoint), lazy=args.lazy)


def cmd_stats(args: argparse.Namespace) -> int:
    from .mount.stats import read_stats

    counters = read_stats(str(args.mountpoint))
    if args.json:
        print(json.dumps(counters, indent=2, sort_keys=True))
        return 0
    width = max(map(len, counters), default=0)
    for key in sorted(counters):
        value = counters[key]
        shown = (f"{value} ({human(value)})" if key.endswith("bytes") and
                 isinstance(value, int) and value >= 1024 else value)
        print(f"{key.ljust(width)}  {shown}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .mount import doctor

    checks = doctor.local_checks()
    if args.ref:
        ref = parse(args.ref)
        creds = _credentials(args, ref.host)

        async def run(client: RegistryClient) -> list[doctor.Check]:
            return await doctor.registry_checks(client, creds is not None)

        checks += trio.run(_with_client, args, ref, run, creds)
    failed = any(c.state == doctor.FAIL for c in checks)
    if args.json:
        print(json.dumps([{"check": c.name, "state": c.state.lower(), "detail": c.detail,
                           "fix": c.fix or None} for c in checks], indent=2))
        return 1 if failed else 0
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.state:<4}  {c.name.ljust(width)}  {c.detail}")
        if c.fix and c.state != doctor.OK:
            print(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    print("something needs fixing" if failed else "all good")
    return 1 if failed else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "push": cmd_push, "pull": cmd_pull, "ls": cmd_ls, "tag": cmd_tag, "inspect": cmd_inspect,
    "rm": cmd_rm, "cp": cmd_cp, "sign": cmd_sign, "verify": cmd_verify, "index": cmd_index,
    "login": cmd_login, "logout": cmd_logout,
    "mount": cmd_mount, "unmount": cmd_unmount, "warm": cmd_warm, "stats": cmd_stats, "doctor": cmd_doctor,
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
    except BrokenPipeError:
        # `galleryfs inspect REF | head`: the reader has what it wanted. Quiet, as a tool
        # killed by SIGPIPE is; stdout pointed away so the exit's flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A local file problem (disk full, permission denied) is the user's to fix, not a crash.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"galleryfs: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1

