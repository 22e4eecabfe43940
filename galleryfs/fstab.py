"""`mount.fuse.galleryfs`: galleryfs for mount(8), /etc/fstab and systemd mount units.

mount(8) runs `/sbin/mount.fuse.galleryfs SOURCE MOUNTPOINT [-sfnv] -o OPT,OPT=VALUE,...`
for the type `fuse.galleryfs`. Each `-o` option becomes the mount's long option, with `_`
and `-` alike (`cache_dir=/var/cache/g` is `--cache-dir /var/cache/g`, `plain_http` is
`--plain-http`), as rclone's helper does; the generic options mount(8) and systemd pass
along for every file system are dropped. scripts/setup installs the helper (as root).
"""

from __future__ import annotations

import sys

from . import cli
from .errors import UsageError

# Options of any file system: mount(8) and systemd use them, the daemon has no say.
# default_permissions: a galleryfs mount always has it; ro: it is always read-only.
GENERIC = frozenset({
    "rw", "ro", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "auto", "noauto",
    "user", "nouser", "users", "owner", "group", "defaults", "_netdev", "nofail", "async",
    "sync", "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "diratime", "nodiratime", "lazytime", "nolazytime", "dirsync", "mand", "nomand",
    "silent", "loud", "default_permissions",
})
GENERIC_PREFIXES = ("x-", "comment=", "helper=")
USAGE = "usage: mount.fuse.galleryfs SOURCE MOUNTPOINT [-o OPTION[=VALUE],...]"


def to_arguments(options: list[str]) -> list[str]:
    """Long options of `galleryfs mount` for the comma-separated `-o` option lists."""
    out: list[str] = []
    for group in options:
        for option in group.split(","):
            option = option.strip()
            if not option or option in GENERIC or option.startswith(GENERIC_PREFIXES):
                continue
            key, sep, value = option.partition("=")
            flag = "--" + key.strip().replace("_", "-")
            # One argument, `--key=value`: a value starting with `-` (a path, a user) is
            # still this option's value, never an option of its own.
            out.append(f"{flag}={value}" if sep else flag)
    return out


def parse(argv: list[str]) -> tuple[str, str, list[str], bool]:
    """(source, mountpoint, -o lists, fake) from mount(8)'s arguments."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.append(next(args, ""))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg in ("-t", "-N"):  # the type (fuse.galleryfs) and a namespace: not ours
            next(args, None)
        elif arg.startswith("-") and len(arg) > 1:
            fake = fake or "f" in arg[1:]  # -s sloppy, -n no mtab, -v verbose: nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError(f"expected SOURCE and MOUNTPOINT; {USAGE}")
    return positional[0], positional[1], options, fake


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        source, mountpoint, options, fake = parse(args)
    except UsageError as exc:
        print(f"mount.fuse.galleryfs: {exc}", file=sys.stderr)
        return 2
    argv = ["mount", source, mountpoint, *to_arguments(options)]
    # Parsed as the mount will parse it (abbreviations too: `-o fore` is --foreground).
    args = cli.build_parser().parse_args(argv)
    if args.foreground or args.password_stdin:
        # mount(8) and systemd wait for the helper to return, with no terminal to read.
        print(f"mount.fuse.galleryfs: -o {'foreground' if args.foreground else 'password_stdin'}"
              " cannot be used from mount(8): it waits for the helper (use password_file)",
              file=sys.stderr)
        return 2
    if fake:  # mount -f: do everything but mount
        return 0
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
