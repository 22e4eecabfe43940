"""The CLI against real registries: push, pull, ls, tag, inspect, rm, cp, login, errors."""

from __future__ import annotations

import base64
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from galleryfs.cli import main
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.mounting import isolated_env
from tests.registry_harness import Registry
from tests.schema import pushed, validate_every_config


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials and the blob-location hints must not leak between tests or from the user.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture(autouse=True)
def _configs_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every config pushed here must validate against ModelPack's published schema.
    validate_every_config(monkeypatch)


def cli(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([*args])
    out, err = capsys.readouterr()
    return code, out, err


def conn(reg: Registry) -> list[str]:
    args: list[str] = []
    if reg.plain_http:
        args.append("--plain-http")
    if reg.ca_file:
        args += ["--ca-file", reg.ca_file]
    return args


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    _, mismatch, errors = filecmp.cmpfiles(a, b, files_a, shallow=False)
    assert mismatch == [] and errors == []


def test_push_pull_round_trip_and_dedup(registry: Registry, model_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    ref = f"{registry.host}/team-a/minilm:v1"
    code, out, err = cli(capsys, "push", str(model_dir), ref, *conn(registry))
    assert code == 0, err
    digest = out.split("@", 1)[1].split()[0]
    assert "13 uploaded" in out
    manifest, config = pushed(registry.host, "team-a/minilm", "v1")  # schema-checked
    assert config["config"] == {"architecture": "BertModel", "format": "safetensors",
                                "paramSize": "22.7M", "precision": "float32"}
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
    info = json.loads(cli(capsys, "inspect", ref, *conn(registry))[1])
    model = info["model"]
    assert model["format"] == "safetensors" and model["architecture"] == "BertModel"
    assert model["modelType"] == "bert" and model["dtypes"] == ["F32", "I64"]
    assert 22_000_000 < model["parameters"] < 23_500_000
    weights = next(f for f in info["files"] if f["path"] == "model.safetensors")
    assert weights["size"] == (model_dir / "model.safetensors").stat().st_size
    assert weights["dtypes"] == ["F32", "I64"] and weights["parameters"] == model["parameters"]
    assert weights["tensors"] > 90
    assert weights["chunkTable"] == {"chunkSize": 64 << 10,
                                     "chunks": -(-weights["size"] // (64 << 10))}

    # Same directory again: same digest, nothing sent.
    code, out2, _ = cli(capsys, "push", str(model_dir), ref, *conn(registry))
    assert code == 0
    assert digest in out2 and "0 uploaded" in out2 and "13 already there" in out2

    dest = tmp_path / "pulled"
    code, out, err = cli(capsys, "pull", ref, str(dest), *conn(registry))
    assert code == 0, err
    same_tree(model_dir, dest)
    assert (dest / "1_Pooling" / "config.json").is_file()

    # A second model in the same registry gets the blobs by cross-repository mount.
    code, out, _ = cli(capsys, "push", str(model_dir), f"{registry.host}/team-b/minilm:v1", *conn(registry))
    assert code == 0 and "13 mounted" in out and "0 uploaded" in out and digest in out


def test_tag_ls_inspect_rm(registry: Registry, model_dir: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small"
    (small / "sub").mkdir(parents=True)
    (small / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "model_type": "llama", "torch_dtype": "bfloat16"}))
    (small / "sub" / "weights.bin").write_bytes(b"\x80" + b"x" * 1000)
    base = f"{registry.host}/gal/llm/base"
    assert cli(capsys, "push", str(small), f"{base}:v1", "-a", "team=nlp", *conn(registry))[0] == 0
    assert cli(capsys, "tag", f"{base}:v1", "prod", "stable", *conn(registry))[0] == 0

    code, out, _ = cli(capsys, "ls", registry.host, "--json", *conn(registry))
    assert code == 0 and json.loads(out) == [{"gallery": "gal", "models": 1}]
    code, out, _ = cli(capsys, "ls", f"{registry.host}/gal", *conn(registry))
    assert code == 0 and "llm/base" in out
    code, out, _ = cli(capsys, "ls", base, "--json", *conn(registry))
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["tags"] == ["prod", "stable", "v1"] and rows[0]["files"] == 2

    code, out, _ = cli(capsys, "inspect", f"{base}:prod", *conn(registry))
    info = json.loads(out)
    assert info["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert [f["path"] for f in info["files"]] == ["config.json", "sub/weights.bin"]
    assert "galleryfs" not in info["config"]  # ModelPack's schema allows no such key
    assert info["model"] == {"format": "pytorch", "architecture": "LlamaForCausalLM",
                             "architectures": ["LlamaForCausalLM"], "modelType": "llama",
                             "precision": "bfloat16"}
    assert info["annotations"] == {"team": "nlp",
                                   "io.galleryfs.model.architectures": "LlamaForCausalLM",
                                   "io.galleryfs.model.type": "llama"}
    assert info["config"]["config"]["precision"] == "bfloat16"
    assert [f["size"] for f in info["files"]] == [(small / "config.json").stat().st_size, 1001]

    # A tag shared with others cannot be removed alone on Distribution 2.x: clear refusal.
    code, _, err = cli(capsys, "rm", f"{base}:prod", *conn(registry))
    assert code == 1 and "also tagged" in err and "Traceback" not in err
    # The whole revision can.
    digest = info["digest"]
    code, out, err = cli(capsys, "rm", f"{base}@{digest}", *conn(registry))
    assert code == 0, err
    code, _, err = cli(capsys, "inspect", f"{base}:v1", *conn(registry))
    assert code == 1 and "not found" in err

    # A tag that is the revision's only name removes the revision.
    assert cli(capsys, "push", str(small), f"{base}:solo", *conn(registry))[0] == 0
    assert cli(capsys, "rm", f"{base}:solo", *conn(registry))[0] == 0
    assert cli(capsys, "inspect", f"{base}:solo", *conn(registry))[0] == 1


def test_copy_promotes_between_galleries(registry: Registry, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + os.urandom(5000))
    assert cli(capsys, "push", str(src), f"{registry.host}/dev/m:v1", *conn(registry))[0] == 0
    code, out, err = cli(capsys, "cp", f"{registry.host}/dev/m:v1", f"{registry.host}/prod/m:released",
                         *conn(registry))
    assert code == 0, err
    a = json.loads(cli(capsys, "inspect", f"{registry.host}/dev/m:v1", *conn(registry))[1])
    b = json.loads(cli(capsys, "inspect", f"{registry.host}/prod/m:released", *conn(registry))[1])
    assert a["digest"] == b["digest"]
    dest = tmp_path / "out"
    assert cli(capsys, "pull", f"{registry.host}/prod/m:released", str(dest), *conn(registry))[0] == 0
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_copy_to_a_digest_is_refused_before_any_blob_moves(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(20_000))
    (src / "config.json").write_text("{}")
    assert cli(capsys, "push", str(src), f"{registry.host}/dev/m:v1", *conn(registry))[0] == 0
    info = json.loads(cli(capsys, "inspect", f"{registry.host}/dev/m:v1", *conn(registry))[1])
    target = f"{registry.host}/prod/m@{info['digest']}"
    code, out, err = cli(capsys, "cp", f"{registry.host}/dev/m:v1", target, *conn(registry))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "takes a tag, not a digest" in err, err
    # Not one blob (layers nor config) reached the target repository, not even mounted.
    blobs = [f["digest"] for f in info["files"]] + [info["manifest"]["config"]["digest"]]
    assert len(blobs) == 3

    async def present() -> list[str]:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            return [d for d in blobs if await client.blob_size("prod/m", d) is not None]

    assert trio.run(present) == []
    repositories = registry.storage_dir / "docker" / "registry" / "v2" / "repositories"
    assert (repositories / "dev" / "m").is_dir() and not (repositories / "prod").exists()


def test_copy_across_registries(registry: Registry, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(300_000))
    with Registry("plain") as other:
        assert cli(capsys, "push", str(src), f"{registry.host}/dev/m:v1", *conn(registry))[0] == 0
        code, _, err = cli(capsys, "cp", f"{registry.host}/dev/m:v1", f"{other.host}/mirror/m:v1",
                           *conn(registry))
        assert code == 0, err
        dest = tmp_path / "out"
        assert cli(capsys, "pull", f"{other.host}/mirror/m:v1", str(dest), *conn(other))[0] == 0
        assert (dest / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


def test_basic_auth_login_and_wrong_password(basic_registry: Registry, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    reg = basic_registry
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    ref = f"{reg.host}/g/m:v1"
    code, _, err = cli(capsys, "push", str(src), ref, *conn(reg))
    assert code == 1 and "authentication required" in err

    code, _, err = cli(capsys, "login", reg.host, "-u", reg.username, "--password-stdin", *conn(reg),
                       stdin="wrong\n", monkeypatch=monkeypatch)
    assert code == 1 and "wrong username or password" in err
    assert "wrong" not in err.replace("wrong username", "")  # the secret is not echoed

    code, out, err = cli(capsys, "login", reg.host, "-u", reg.username, "--password-stdin", *conn(reg),
                         stdin=f"{reg.password}\n", monkeypatch=monkeypatch)
    assert code == 0, err
    store = Path(os.environ["XDG_CONFIG_HOME"]) / "galleryfs" / "auth.json"
    assert store.stat().st_mode & 0o777 == 0o600
    assert cli(capsys, "push", str(src), ref, *conn(reg))[0] == 0
    assert cli(capsys, "logout", reg.host)[0] == 0
    assert cli(capsys, "inspect", ref, *conn(reg))[0] == 1


def test_docker_config_credentials(basic_registry: Registry, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    reg = basic_registry
    docker = Path(os.environ["DOCKER_CONFIG"])
    docker.mkdir(parents=True)
    auth = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    code, _, err = cli(capsys, "push", str(src), f"{reg.host}/g/m:v1", *conn(reg))
    assert code == 0, err


def test_token_auth_caches_tokens(token_registry: Registry, model_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    reg = token_registry
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(reg.password + "\n"))
    ref = f"{reg.host}/g/minilm:v1"
    code, out, err = cli(capsys, "push", str(model_dir), ref, "-u", reg.username, "--password-stdin",
                         *conn(reg))
    assert code == 0, err
    # 13 files, HEADs, uploads and a manifest: one token per distinct scope, not per request.
    assert reg.token_server.requests <= 4
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(reg.password + "\n"))
    dest = tmp_path / "out"
    code, _, err = cli(capsys, "pull", ref, str(dest), "-u", reg.username, "--password-stdin", *conn(reg))
    assert code == 0, err
    same_tree(model_dir, dest)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("nope\n"))
    code, _, err = cli(capsys, "inspect", ref, "-u", reg.username, "--password-stdin", *conn(reg))
    assert code == 1 and "wrong username or password" in err


def test_tls_registry(tls_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tls_registry
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    code, _, err = cli(capsys, "push", str(src), f"{reg.host}/g/m:v1", "--quiet")
    assert code == 1 and "certificate" in err.lower() and "--ca-file" in err
    code, _, err = cli(capsys, "push", str(src), f"{reg.host}/g/m:v1", *conn(reg))
    assert code == 0, err
    code, out, _ = cli(capsys, "ls", f"{reg.host}/g/m", "--json", *conn(reg))
    assert code == 0 and json.loads(out)[0]["tags"] == ["v1"]


def test_oras_pushed_artifact_is_readable(registry: Registry, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import oras.client

    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(100_000))
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # oras names the file by the path it was given
    try:
        client.push(target=f"{registry.host}/oras/m:v1", files=["weights.bin"])
    finally:
        os.chdir(cwd)
    info = json.loads(cli(capsys, "inspect", f"{registry.host}/oras/m:v1", *conn(registry))[1])
    assert [f["path"] for f in info["files"]] == ["weights.bin"]
    dest = tmp_path / "out"
    code, _, err = cli(capsys, "pull", f"{registry.host}/oras/m:v1", str(dest), *conn(registry))
    assert code == 0, err
    assert (dest / "weights.bin").read_bytes() == src.read_bytes()


def test_pull_refuses_non_empty_target_and_leaves_nothing(registry: Registry, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 10)
    assert cli(capsys, "push", str(src), f"{registry.host}/g/m:v1", *conn(registry))[0] == 0
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "pull", f"{registry.host}/g/m:v1", str(target), *conn(registry))
    assert code == 2 and "not an empty directory" in err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    # Corrupt the blob in the registry's storage: the pull fails verification, leaves nothing.
    blob = next(p for p in Path(registry.storage_dir).rglob("data")
                if p.stat().st_size == 10)
    blob.write_bytes(b"b" * 10)
    dest = tmp_path / "fresh"
    code, _, err = cli(capsys, "pull", f"{registry.host}/g/m:v1", str(dest), *conn(registry))
    assert code == 1 and "digest" in err
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if "galleryfs-" in p.name]


def test_pull_into_a_link_or_dot_is_refused_before_the_download(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 10)
    assert cli(capsys, "push", str(src), f"{registry.host}/g/m:v1", *conn(registry))[0] == 0
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = cli(capsys, "pull", f"{registry.host}/g/m:v1", str(tmp_path / "link"),
                       *conn(registry))
    assert code == 2 and "symbolic link" in err, err
    monkeypatch.chdir(tmp_path / "real")
    code, _, err = cli(capsys, "pull", f"{registry.host}/g/m:v1", ".", *conn(registry))
    assert code == 2 and "by its own name" in err, err
    assert not list((tmp_path / "real").iterdir()) and (tmp_path / "link").is_symlink()
    assert not [p for p in tmp_path.iterdir() if "galleryfs-" in p.name]


def test_output_into_a_closed_pipe_ends_quietly(registry: Registry, tmp_path: Path) -> None:
    # `galleryfs inspect REF | head -1`: no "error: Broken pipe" once head has its line.
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 10)
    env = isolated_env(tmp_path)
    pushed = subprocess.run([sys.executable, "-m", "galleryfs", "push", str(src),
                             f"{registry.host}/g/m:v1", "--plain-http"], capture_output=True,
                            text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert pushed.returncode == 0, pushed.stderr
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        done = subprocess.run([sys.executable, "-m", "galleryfs", "inspect", "--plain-http",
                               f"{registry.host}/g/m:v1"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=env,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "galleryfs", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["push", "/etc/hostname", "{host}/g/m:v1"], "not a directory", 2),
        (["push", "/nonexistent-dir", "{host}/g/m:v1"], "no such directory", 2),
        (["pull", "{host}/g/unknown:v1", "{tmp}/x"], "not found", 1),
        (["inspect", "not a ref"], "invalid reference", 2),
        (["ls", "127.0.0.1:1", "--timeout", "2"], "cannot reach registry", 1),
        (["push", "{tmp}", "{host}/g/m@sha256:" + "a" * 64], "takes a tag", 2),
        (["push", "{tmp}", "{host}/g/m:v1", "--created", "yesterday"], "RFC 3339", 2),
        (["push", "{tmp}", "{host}/g/m:v1", "-a", "io.galleryfs.model.type=x"], "galleryfs's own", 2),
    ],
)
def test_errors_are_one_line(registry: Registry, tmp_path: Path, args: list[str], message: str,
                             code: int) -> None:
    (tmp_path / "f").write_text("x")
    filled = [a.format(host=registry.host, tmp=tmp_path) for a in args]
    result = _run(*filled, "--plain-http")
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("created", [
    "yesterday", "2025-01-01", "2025-01-01T00:00:00", "2025-01-01 00:00:00Z",
    "2025-02-30T00:00:00Z", "2025-01-01T24:00:00Z", "2025-01-01T00:00:00+2:00",
    "2025-01-01T00:00:00+24:00", "1714564800", "2025-01-01T00:00:00Z\n", "",
])
def test_created_must_be_rfc3339_and_nothing_is_sent(registry: Registry, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     created: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code, out, err = cli(capsys, "push", str(tmp_path / "m"), f"{registry.host}/g/m:v1",
                         "--created", created, *conn(registry))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not an RFC 3339 date-time" in err, err
    # Refused before the registry heard anything: no repository, no blob.
    assert not (registry.storage_dir / "docker").exists()


def test_created_and_annotations_are_kept_where_the_schema_allows(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                 "model_type": "gpt2"}))
    (src / "w.bin").write_bytes(b"\x80" + os.urandom(100))
    ref = f"{registry.host}/g/m"
    for tag, created in (("utc", "2025-06-01T12:00:00Z"), ("offset", "2025-06-01T14:00:00.5+02:00"),
                         ("lower", "2025-06-01t12:00:00z")):
        code, _, err = cli(capsys, "push", str(src), f"{ref}:{tag}", "--created", created,
                           "-a", "team=nlp", "-a", "org.opencontainers.image.source=https://x",
                           *conn(registry))
        assert code == 0, err
        manifest, config = pushed(registry.host, "g/m", tag)  # schema-checked, formats too
        assert config["descriptor"] == {"createdAt": created}
        assert manifest["annotations"]["org.opencontainers.image.created"] == created
        assert manifest["annotations"]["team"] == "nlp"
        info = json.loads(cli(capsys, "inspect", f"{ref}:{tag}", *conn(registry))[1])
        assert info["created"] == created and info["model"]["createdAt"] == created
    rows = json.loads(cli(capsys, "ls", ref, "--json", *conn(registry))[1])
    assert {r["created"] for r in rows} == {"2025-06-01T12:00:00Z", "2025-06-01T14:00:00.5+02:00",
                                            "2025-06-01t12:00:00z"}


def test_httpx_command_line_tool_is_not_imported() -> None:
    """httpx imports its CLI (click, rich) when they are installed, as they are here;
    galleryfs keeps it out of every command's start-up."""
    code = ("import sys, galleryfs.cli, httpx; "
            "print(sorted(m for m in ('click', 'rich') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_sizes_and_a_zero_cache_size() -> None:
    from galleryfs.cli import parse_size
    from galleryfs.errors import UsageError

    assert parse_size("512M") == 512 << 20 and parse_size("10G") == 10 << 30
    assert parse_size("0", zero=True) == 0
    for bad, zero in (("0", False), ("-1G", True), ("lots", True), ("nan", True), ("inf", True),
                      ("1e400", True), ("9999999T", True)):
        with pytest.raises(UsageError):
            parse_size(bad, zero=zero)
