"""MODEL as a Hugging Face repo id: resolved from a hub cache the test lays out (offline), and every error path
(no connection, not cached, missing, gated, unknown revision, no safetensors) in one line, exit code 2. The
hub is a local HTTP server on loopback that answers as the hub does; nothing leaves the machine."""
import http.server
import shutil
import threading

import pytest

from neuqi_export.cli import main
from neuqi_export.errors import UserError
from neuqi_export.hub import is_repo_id, resolve_model
from neuqi_export.master_store import is_master_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _lay_out_cache(cache, repo_id, src, files=None):
    """A HF hub cache entry for repo_id (refs/main -> one snapshot holding src's files), as huggingface_hub
    writes it (blobs are plain files here, which its cache reader accepts)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_what_counts_as_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id("Qwen/Qwen3-0.6B") and is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_repo_id("smollm2") and not is_repo_id("./a/b") and not is_repo_id("/abs/path")
    assert not is_repo_id("a/b/c")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_id("org/name")  # an existing local path wins


def test_offline_resolves_from_the_cache_and_quantizes(hub_env, tiny_llama_dir, tmp_path, monkeypatch, real_assets):
    snap = _lay_out_cache(hub_env, "org/tiny", tiny_llama_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/tiny") == str(snap)
    rc = main(["quantize", "org/tiny", "-o", str(tmp_path / "m"), "--bits", "4", "--group-size", "32",
               "--calib", str(real_assets.calib_text), "--nsamples", "2", "--seqlen", "32", "--quiet"])
    assert rc == 0 and is_master_dir(tmp_path / "m")


def _fails(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_offline_miss_and_no_connection_are_one_line(hub_env, tmp_path, monkeypatch, capsys):
    out = ["-o", str(tmp_path / "m"), "--no-calib"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(["quantize", "org/absent"] + out, capsys, "not in the Hugging Face cache", "HF_HUB_OFFLINE",
           "local model directory")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    _fails(["quantize", "org/absent"] + out, capsys, "no connection", "HF_HUB_OFFLINE=1", "local model directory")
    assert not (tmp_path / "m").exists()


def test_revision_is_only_for_repo_ids(tiny_llama_dir, tmp_path, capsys):
    _fails(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "m"), "--no-calib", "--revision", "v1"], capsys,
           "--revision", "local path")


def test_a_cached_repo_without_safetensors_is_refused(hub_env, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    _lay_out_cache(hub_env, "org/binonly", tiny_llama_dir, files={"config.json", "tokenizer.json"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(["quantize", "org/binonly", "-o", str(tmp_path / "m"), "--no-calib"], capsys, "no safetensors")


class _HubAnswers(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers a missing, gated or unknown-revision repo (X-Error-Code)."""

    code = {"missing": (404, "RepoNotFound"), "gated": (401, "GatedRepo"), "badrev": (404, "RevisionNotFound")}

    def _answer(self):
        name = next(p for p in self.path.split("/") if p.endswith("-model"))
        status, err = self.code[name.split("-")[0]]
        self.send_response(status)
        self.send_header("X-Error-Code", err)
        self.send_header("X-Error-Message", err)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "x"}')

    do_GET = do_HEAD = _answer

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_hub(hub_env, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo,revision,words", [
    ("org/missing-model", None, ("no Hugging Face repo", "check the id")),
    ("org/gated-model", None, ("gated", "HF_TOKEN")),
    ("org/badrev-model", "nope", ("no such revision", "--revision")),
])
def test_hub_errors_are_one_line(fake_hub, repo, revision, words, tmp_path, capsys):
    with pytest.raises(UserError):
        resolve_model(repo, revision)
    argv = ["quantize", repo, "-o", str(tmp_path / "m"), "--no-calib"] + (["--revision", revision] if revision else [])
    _fails(argv, capsys, *words)
