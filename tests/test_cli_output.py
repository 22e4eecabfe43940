"""The CLI for scripts and people: --json and --quiet, help on every subcommand, `stats`
on a real mount and `doctor` against real registries."""

from __future__ import annotations

import argparse
import email.utils
import json
import socket
import time
from pathlib import Path

import pytest

from galleryfs.cli import HELP, build_parser
from galleryfs.mount import doctor
from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry
from tests.test_cli import cli


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def small_model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "sub" / "w.bin").write_bytes(b"w" * 5000)
    return src


def test_json_and_quiet_outputs(registry: Registry, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    src = small_model(tmp_path)
    ref = f"{registry.host}/g/m:v1"
    code, out, err = cli(capsys, "push", str(src), ref, "--plain-http", "--json")
    assert code == 0, err
    pushed = json.loads(out)
    digest = pushed["digest"]
    assert digest.startswith("sha256:") and pushed["tags"] == ["v1"]
    assert pushed["uploaded"] == 2 and pushed["existing"] == 0
    assert pushed["reference"] == f"{registry.host}/g/m"

    # --quiet: the digest and nothing else, as `docker push -q`.
    code, out, _ = cli(capsys, "push", str(src), ref, "--plain-http", "--quiet")
    assert code == 0 and out == digest + "\n"

    code, out, _ = cli(capsys, "tag", ref, "prod", "stable", "--plain-http", "--json")
    assert code == 0 and json.loads(out) == {"reference": f"{registry.host}/g/m",
                                             "digest": digest, "tags": ["prod", "stable"]}

    # ls --json: tags as a list, no "-" placeholder for a missing creation time.
    code, out, _ = cli(capsys, "ls", f"{registry.host}/g/m", "--plain-http", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1
    assert rows[0]["digest"] == digest and rows[0]["created"] is None
    assert sorted(rows[0]["tags"]) == ["prod", "stable", "v1"]
    code, out, _ = cli(capsys, "ls", f"{registry.host}/g/m", "--plain-http", "--quiet")
    assert out.split() == [digest]
    code, out, _ = cli(capsys, "ls", f"{registry.host}/g/m", "--plain-http")
    assert "-" in out.split() and "prod,stable,v1" in out.replace(" ", "")

    code, out, _ = cli(capsys, "pull", ref, str(tmp_path / "a"), "--plain-http", "--quiet")
    assert code == 0 and out == "" and (tmp_path / "a" / "sub" / "w.bin").stat().st_size == 5000
    code, out, _ = cli(capsys, "pull", ref, str(tmp_path / "b"), "--plain-http", "--json")
    assert code == 0 and json.loads(out) == {
        "reference": f"{registry.host}/g/m", "digest": digest,
        "directory": str(tmp_path / "b"), "files": 2, "size": 5000 + len('{"model_type": "bert"}')}

    code, out, _ = cli(capsys, "cp", ref, f"{registry.host}/h/m:v2", "--plain-http", "--quiet")
    assert code == 0 and out == digest + "\n"
    code, out, _ = cli(capsys, "cp", ref, f"{registry.host}/h/m", "--plain-http", "--json")
    assert code == 0 and json.loads(out)["tag"] == "v1" and json.loads(out)["digest"] == digest

    code, out, err = cli(capsys, "rm", f"{registry.host}/h/m@{digest}", "--plain-http", "--quiet")
    assert code == 0 and out == "", err

    # --json and --quiet together make no sense: refused by the parser.
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["push", str(src), ref, "--json", "--quiet"])
    assert exc.value.code == 2


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_explains_itself_with_an_example() -> None:
    subs = _subparsers()
    assert set(subs) == set(HELP)
    for name, p in subs.items():
        text = p.format_help()
        assert p.description and len(p.description) > 30, name
        assert "examples:\n  galleryfs " + name in text, name
        for action in p._actions:
            if action.option_strings and action.dest != "help" or not action.option_strings:
                assert action.help, f"{name} {action.dest} has no help"


def test_options_that_do_not_apply_are_not_offered() -> None:
    subs = _subparsers()

    def options(name: str) -> set[str]:
        return {o for a in subs[name]._actions for o in a.option_strings}

    for local in ("logout", "unmount", "stats"):
        assert not options(local) & {"--plain-http", "--timeout", "--ca-file", "--password-stdin"}
    assert not options("mount") & {"--quiet", "--json"}
    assert not options("inspect") & {"--quiet"}  # it prints JSON; quiet would print nothing
    assert "--json" in options("ls") and "--quiet" in options("push")


def test_stats_of_a_real_mount(registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    src = small_model(tmp_path)
    assert galleryfs("push", str(src), f"{registry.host}/g/m:v1", "--plain-http",
                     env=env).returncode == 0
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--cache-size", "0") as mnt:
        assert (mnt / "g" / "m" / "v1" / "sub" / "w.bin").read_bytes() == b"w" * 5000
        r = galleryfs("stats", str(mnt), "--json", env=env)
        assert r.returncode == 0, r.stderr
        counters = json.loads(r.stdout)
        assert counters["inodes"] > 3 and counters["verify_failures"] == 0
        assert counters["verified_chunks"] >= 1
        r = galleryfs("stats", str(mnt), env=env)
        assert r.returncode == 0 and r.stdout.startswith(min(counters))
        assert any(line.split()[0] == "inodes" for line in r.stdout.splitlines())
    r = galleryfs("stats", str(tmp_path), env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith("is not the root of a galleryfs mount")
    assert "Traceback" not in r.stderr


def test_doctor_on_this_machine_and_against_registries(
        registry: Registry, basic_registry: Registry, tls_registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    r = galleryfs("doctor", env=env)
    assert r.returncode == 0, r.stdout  # the suite itself mounts: FUSE works here
    assert r.stdout.splitlines()[-1] == "all good"

    r = galleryfs("doctor", registry.host, "--plain-http", "--json", env=env)
    assert r.returncode == 0, r.stdout
    checks = {c["check"]: c for c in json.loads(r.stdout)}
    assert checks[f"registry {registry.host}"]["state"] == "ok"
    assert checks["clock"]["state"] == "ok" and checks["credentials"]["state"] == "ok"

    # Nothing listens on a closed port: one FAIL naming it, with a fix, exit 1.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = galleryfs("doctor", f"127.0.0.1:{port}", "--plain-http", "--timeout", "5", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = next(x for x in r.stdout.splitlines() if f"registry 127.0.0.1:{port}" in x)
    assert line.startswith("FAIL") and "fix:" in r.stdout

    r = galleryfs("doctor", basic_registry.host, "--plain-http", env=env)
    assert r.returncode == 1
    assert any(x.startswith("FAIL") and "credentials" in x for x in r.stdout.splitlines())
    assert "galleryfs login" in r.stdout
    good = galleryfs_stdin(["doctor", basic_registry.host, "--plain-http", "-u",
                            basic_registry.username, "--password-stdin"],
                           basic_registry.password, env)
    assert good.returncode == 0, good.stdout

    r = galleryfs("doctor", tls_registry.host, env=env)
    assert r.returncode == 1 and "--ca-file" in r.stdout
    r = galleryfs("doctor", tls_registry.host, "--ca-file", str(tls_registry.ca_file), env=env)
    assert r.returncode == 0, r.stdout


def galleryfs_stdin(args: list[str], stdin: str, env: dict[str, str]):  # noqa: ANN201
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "galleryfs", *args], input=stdin + "\n",
                          capture_output=True, text=True, timeout=120, env=env)


def test_doctor_clock_check() -> None:
    now = time.time()
    assert doctor._clock(email.utils.formatdate(now, usegmt=True), now).state == doctor.OK
    late = doctor._clock(email.utils.formatdate(now - 600, usegmt=True), now)
    assert late.state == doctor.FAIL and "s ahead of" in late.detail and late.fix
    assert doctor._clock(None, now).state == doctor.WARN
    assert doctor._clock("yesterday", now).state == doctor.WARN
