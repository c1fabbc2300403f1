"""engine.models: OpenAI's file formats, the safe cache, and clear errors for bad files."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import shutil
import threading

import pytest
import torch

from engine import models as m
from engine import random_models


def test_clip_from_torchscript_archive_and_state_dict_agree(tiny_model_files):
    scripted = m.load_clip(str(tiny_model_files.clip_torchscript), trust=True)   # made by the fixture
    plain = m.load_clip(str(tiny_model_files.clip_state_dict))   # a state dict: no trust needed
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, 0], tokens[0, 1], tokens[0, 2] = 49406, 320, 49407
    with torch.no_grad():
        a, b = scripted.encode_text(tokens), plain.encode_text(tokens)
    assert a.dtype == torch.float32 and a.shape == (1, 32)
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in scripted.parameters())


def test_decoder_pickle_needs_trust_then_loads_from_the_safe_cache(tiny_model_files, tmp_path):
    pickle = tmp_path / "decoder.pkl"
    shutil.copy(tiny_model_files.decoder_pickle, pickle)
    cache = tmp_path / "cache"
    with pytest.raises(m.UntrustedPickleError, match="decoder.pkl"):
        m.load_dvae("decoder", str(pickle), cache_dir=cache)
    first = m.load_dvae("decoder", str(pickle), cache_dir=cache, trust=True)
    safe = m.safe_cache_path(cache, "decoder", m.sha256_of(pickle))
    assert safe.is_file()
    # Second load: no trust needed and no unpickling, the weights come from safetensors.
    torch_load = torch.load
    try:
        torch.load = lambda *a, **k: pytest.fail("the pickle was read again")  # type: ignore[assignment]
        second = m.load_dvae("decoder", str(pickle), cache_dir=cache)
    finally:
        torch.load = torch_load
    assert isinstance(second, m.Decoder)
    codes = torch.nn.functional.one_hot(torch.randint(8192, (1, 4, 4)), 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.equal(first(codes), second(codes))
    assert not any(p.requires_grad for p in second.parameters())
    assert not second.training
    # No fp16 casts of dall_e's own: the engine's autocast decides the precision.
    convs = [c for c in list(first.modules()) + list(second.modules()) if isinstance(c, m.DalleConv2d)]
    assert convs and not any(c.use_float16 for c in convs)


def test_a_decoder_built_in_memory_is_prepared_as_a_loaded_one(tiny_model_files, tmp_path):
    """`prepare_decoder` (the benchmarks' models, built without files) gives the decoder that
    `load_dvae` gives from OpenAI's pickle: frozen, eval, no fp16 casts of dall_e's own (a fresh
    dall_e Conv2d has them on), channels-last on a CPU; the same pictures."""
    from engine import random_models

    built = random_models.make_decoder(tiny=True, seed=0)
    assert any(c.use_float16 for c in built.modules() if isinstance(c, m.DalleConv2d))   # dall_e's default
    pickle = random_models.save_pickled_module(random_models.make_decoder(tiny=True, seed=0), tmp_path / "d.pkl")
    loaded = m.decoder_layout(m.load_dvae("decoder", str(pickle), cache_dir=tmp_path / "cache", trust=True))
    prepared = m.prepare_decoder(built, "cpu")
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())
    assert not any(c.use_float16 for c in prepared.modules() if isinstance(c, m.DalleConv2d))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in prepared.parameters() if p.dim() == 4)
    codes = torch.nn.functional.one_hot(torch.randint(8192, (1, 4, 4)), 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.equal(prepared(codes), loaded(codes))


def test_a_known_hash_is_trusted_without_the_flag(tiny_model_files, tmp_path):
    digest = m.sha256_of(tiny_model_files.decoder_pickle)
    decoder = m.load_dvae("decoder", str(tiny_model_files.decoder_pickle), cache_dir=tmp_path, known_sha256={digest})
    assert decoder.vocab_size == 8192


def test_a_refusal_says_how_the_caller_trusts_a_file(tiny_model_files, tmp_path):
    """The CLIs' flag by default, the caller's own words otherwise (the bot names its config keys)."""
    path = str(tiny_model_files.decoder_pickle)
    with pytest.raises(m.UntrustedPickleError, match=r"If you trust this file, pass --trust-decoder\.$"):
        m.load_dvae("decoder", path, cache_dir=tmp_path)
    with pytest.raises(m.UntrustedPickleError, match=r"If you trust this file, list it\.$"):
        m.load_dvae("decoder", path, cache_dir=tmp_path, trust_hint="list it")
    digest = m.sha256_of(tiny_model_files.decoder_pickle).upper()   # as some tools print it
    assert m.load_dvae("decoder", path, cache_dir=tmp_path, known_sha256={digest}).vocab_size == 8192


def test_encoder_loads_by_the_same_rules(tiny_model_files, tmp_path):
    with pytest.raises(m.UntrustedPickleError):
        m.load_dvae("encoder", str(tiny_model_files.encoder_pickle), cache_dir=tmp_path)
    encoder = m.load_dvae("encoder", str(tiny_model_files.encoder_pickle), cache_dir=tmp_path, trust=True)
    assert isinstance(encoder, m.Encoder)


def test_a_decoder_pickled_with_a_stale_upsample_still_runs(tmp_path):
    decoder = random_models.make_decoder()
    for group in ("group_1", "group_2", "group_3"):
        # What an older torch leaves in the pickle: no recompute_scale_factor attribute.
        del getattr(decoder.blocks, group).upsample.recompute_scale_factor
    path = random_models.save_pickled_module(decoder, tmp_path / "old.pkl")
    loaded = m.load_dvae("decoder", str(path), cache_dir=tmp_path / "c", trust=True)
    codes = torch.zeros(1, 8192, 2, 2)
    codes[:, 0] = 1
    with torch.no_grad():
        assert loaded(codes).shape == (1, 6, 16, 16)


def test_a_whole_pickle_of_another_projects_classes_is_not_called_corrupt(tmp_path, monkeypatch):
    """A trusted pickle whose classes this install lacks (another model, a renamed module) read as
    "corrupt or truncated": the person would download the same file again."""
    import importlib
    import sys

    (tmp_path / "other_project_model.py").write_text("class Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("other_project_model")
    path = tmp_path / "decoder.pkl"
    torch.save(module.Net(), path)
    monkeypatch.delitem(sys.modules, "other_project_model")
    (tmp_path / "other_project_model.py").unlink()
    with pytest.raises(m.ModelLoadError) as err:
        m.load_dvae("decoder", str(path), cache_dir=tmp_path / "c", trust=True)
    assert str(err.value) == (f"dVAE decoder file {path} is not a dall_e decoder pickle: "
                              "No module named 'other_project_model'")


@pytest.mark.parametrize("which", ["clip", "decoder", "safetensors"])
def test_corrupt_or_truncated_files_name_the_file(tiny_model_files, tmp_path, which):
    if which == "clip":
        src = tiny_model_files.clip_torchscript
    elif which == "decoder":
        src = tiny_model_files.decoder_pickle
    else:
        m.load_dvae("decoder", str(tiny_model_files.decoder_pickle), cache_dir=tmp_path / "c", trust=True)
        src = next((tmp_path / "c" / "dvae").glob("*.safetensors"))
    bad = tmp_path / f"truncated-{which}{src.suffix}"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(m.ModelLoadError) as err:
        if which == "clip":
            m.load_clip(str(bad), trust=True)
        else:
            m.load_dvae("decoder", str(bad), cache_dir=tmp_path / "other", trust=True)
    assert bad.name in str(err.value)


def test_a_missing_download_says_which_file_from_where_and_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(m.urllib.request, "urlopen", offline)
    with pytest.raises(m.ModelLoadError) as err:
        m.load_dvae("decoder", "openai", cache_dir=tmp_path)
    text = str(err.value)
    assert "decoder.pkl" in text and m.DVAE_URLS["decoder"] in text and str(tmp_path / "dvae" / "decoder.pkl") in text
    with pytest.raises(m.ModelLoadError) as err:
        m.load_clip("ViT-B/32", cache_dir=tmp_path)
    assert "ViT-B-32.pt" in str(err.value) and "openaipublic" in str(err.value)


def test_a_download_cut_short_leaves_nothing_behind_and_says_how_to_place_the_file(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 promises 1 MiB and closes after 64 KiB: the download fails
    with the clear offline message (urllib itself hands the short body over as whole: it would be
    pinned as the download), no partial file is left in the cache, and the advice says that a pickle placed by hand must be trusted."""
    import http.server
    import threading

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"\0" * (64 << 10))
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setitem(m.DVAE_URLS, "decoder", f"http://127.0.0.1:{server.server_port}/decoder.pkl")
        with pytest.raises(m.ModelLoadError) as err:
            m.load_dvae("decoder", "openai", cache_dir=tmp_path)
    finally:
        server.shutdown()
    text = str(err.value)
    assert "could not download decoder.pkl" in text and "after 65536 of 1048576 bytes" in text
    assert "placed there by hand" in text and "--trust-decoder" in text
    assert list((tmp_path / "dvae").iterdir()) == []


def test_a_placed_clip_file_with_the_wrong_hash_is_refused(tmp_path, tiny_model_files):
    target = tmp_path / "clip" / "ViT-B-32.pt"
    target.parent.mkdir()
    shutil.copy(tiny_model_files.clip_torchscript, target)
    with pytest.raises(m.ModelLoadError, match="SHA-256"):
        m.load_clip("ViT-B/32", cache_dir=tmp_path)


def test_partial_downloads_left_by_a_stopped_process_are_swept_at_load_but_fresh_ones_are_not(
        tiny_model_files, tmp_path):
    """A process stopped mid-download leaves its `.part-` file in the cache (up to ~340 MB for CLIP).
    The next load removes those not written for an hour; a fresh one may be another process's
    download in progress (the bot and imagine-workers may share a cache) and is left alone."""
    import os
    import time

    cache = tmp_path / "cache"
    (cache / "clip").mkdir(parents=True)
    (cache / "dvae").mkdir()
    stale = cache / "clip" / f"{m.PARTIAL_PREFIX}abc123"
    stale.write_bytes(b"x" * 1024)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    fresh = cache / "dvae" / f"{m.PARTIAL_PREFIX}def456.tmp"
    fresh.write_bytes(b"y" * 1024)
    kept = cache / "clip" / "ViT-B-32.pt"   # not a partial file, however old
    kept.write_bytes(b"z")
    os.utime(kept, (hours_ago, hours_ago))
    pinned = {m.sha256_of(tiny_model_files.decoder_pickle), m.sha256_of(tiny_model_files.clip_torchscript)}
    m.load_models(str(tiny_model_files.clip_torchscript), str(tiny_model_files.decoder_pickle), "cpu", cache,
                  known_sha256=pinned)
    assert not stale.exists() and fresh.exists() and kept.exists()
    # The load's own cache write (the decoder's safetensors copy) left no `.part-` file behind.
    assert [p.name for p in cache.glob(f"*/{m.PARTIAL_PREFIX}*")] == [fresh.name]


@contextlib.contextmanager
def serving(data: bytes, with_length: bool = True, release: threading.Event | None = None,
            requests: list[str] | None = None):
    """A real HTTP server on 127.0.0.1 answering every GET with `data`: with a Content-Length
    header or not (then the body ends when the connection closes); the body waits for `release`
    when one is given (the headers do not); each request's path is appended to `requests`. Yields
    its base URL."""
    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if requests is not None:
                requests.append(self.path)
            self.send_response(200)
            if with_length:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            if release is not None:
                release.wait(60)
            self.wfile.write(data)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        if release is not None:
            release.set()
        server.shutdown()
        server.server_close()


def clip_url(base: str, clip_file) -> str:
    """A URL shaped like OpenAI's CLIP URLs (the folder is the file's SHA-256, which the load checks)."""
    return f"{base}/{m.sha256_of(clip_file)}/ViT-B-32.pt"


class _Announced(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.event.set()


@pytest.mark.parametrize("with_length, size", [(True, "MB"), (False, "size unknown")])
def test_a_download_is_announced_before_its_body_arrives(with_length, size, tiny_model_files, tmp_path,
                                                         monkeypatch, caplog):
    """A first run downloads ~400 MB: one INFO line (engine.models.download) says what, how big
    (Content-Length) and where to, while the body is still on its way, not after minutes of silence.
    The server holds the body back until the line has been logged."""
    data = tiny_model_files.clip_torchscript.read_bytes()
    release = threading.Event()
    announced = _Announced()
    caplog.set_level(logging.INFO, logger=m.download_log.name)
    m.download_log.addHandler(announced)
    loaded = []
    try:
        with serving(data, with_length, release) as base:
            url = clip_url(base, tiny_model_files.clip_torchscript)
            monkeypatch.setitem(m.CLIP_URLS, "ViT-B/32", url)
            load = threading.Thread(target=lambda: loaded.append(m.load_clip("ViT-B/32", cache_dir=tmp_path)))
            load.start()
            assert announced.event.wait(30), "no line before the body arrived"
            assert not loaded
            release.set()
            load.join(60)
    finally:
        m.download_log.removeHandler(announced)
    assert loaded, "the download did not finish"
    shown = f"{len(data) / 1e6:.1f} MB" if with_length else size
    target = tmp_path / "clip" / "ViT-B-32.pt"
    assert announced.messages == [f"downloading ViT-B-32.pt ({shown}) from {url} to {target}"]
    assert target.is_file()


@pytest.mark.parametrize("value, expected", [
    (None, "HOME"),            # unset
    ("", "HOME"),              # empty: unset, not the current folder
    ("~/models", "~/models"),
    ("/srv/cache", "/srv/cache"),
])
def test_imagine_cache_empty_is_unset_and_a_tilde_is_home(value, expected, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HOME", str(tmp_path))
    environ = {} if value is None else {"IMAGINE_CACHE": value}
    wanted = tmp_path / ".cache" / "imagine-bot" if expected == "HOME" else Path(expected.replace("~", str(tmp_path)))
    assert m.default_cache(environ) == wanted


def test_an_imagine_cache_of_no_users_home_is_kept_as_typed():
    """`~typo/models` names the home of no user: pathlib raises RuntimeError, and DEFAULT_CACHE is
    made at import, so the bot, the worker and the CLI died with a traceback on import. Kept as
    typed, as the shell keeps it."""
    import subprocess
    import sys
    from pathlib import Path

    typo = "~imagine-no-such-user/models"
    assert m.default_cache({"IMAGINE_CACHE": typo}) == Path(typo)
    proc = subprocess.run([sys.executable, "-c", "import engine.models as m; print(m.DEFAULT_CACHE)"],
                          capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "IMAGINE_CACHE": typo})
    assert proc.returncode == 0 and proc.stdout == f"{typo}\n", proc.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_cache_folder_that_cannot_be_written_is_the_caches_error_before_any_download(tmp_path, monkeypatch,
                                                                                          tiny_model_files):
    """The cache's clip/ folder exists but no file can be made in it (a read-only cache; here /proc's,
    where not even root can make one). The temporary file is made first: an OSError naming the
    folder, and no connection opened; it was "could not download ... On an offline machine", after
    a request to the server."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "clip").symlink_to("/proc/self")
    requests: list[str] = []
    with serving(tiny_model_files.clip_torchscript.read_bytes(), requests=requests) as base:
        monkeypatch.setitem(m.CLIP_URLS, "ViT-B/32", clip_url(base, tiny_model_files.clip_torchscript))
        with pytest.raises(OSError) as err:
            m.load_clip("ViT-B/32", cache_dir=cache)
    assert err.value.filename == str(cache / "clip") and err.value.strerror, err.value
    assert requests == []


def test_the_loaded_decoder_runs_channels_last_on_a_cpu_and_draws_the_same(tiny_models):
    """oneDNN's convolutions run fastest channels-last (docs/PERFORMANCE.md): load_models lays the
    decoder's weights out so on a CPU. The pictures are the same as the plain layout's."""
    import copy

    from engine.generate import frame_image, to_uint8

    squares = [c.w for c in tiny_models.decoder.modules() if isinstance(c, m.DalleConv2d) and c.w.shape[-1] > 1]
    assert squares and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in squares)
    plain = m.Models(clip=tiny_models.clip, device=tiny_models.device,
                     decoder=copy.deepcopy(tiny_models.decoder).to(memory_format=torch.contiguous_format))
    assert all(c.w.is_contiguous() for c in plain.decoder.modules() if isinstance(c, m.DalleConv2d))
    torch.manual_seed(0)
    logits = torch.randn(2, tiny_models.vocab_size, 8, 8)
    soft = logits.softmax(dim=1)
    assert torch.allclose(tiny_models.decoder(soft), plain.decoder(soft), atol=1e-5)
    ours, theirs = frame_image(tiny_models, logits), frame_image(plain, logits)
    for a, b in zip(ours, theirs):
        assert abs(to_uint8(a).astype(int) - to_uint8(b)).max() <= 1


@pytest.mark.parametrize("metadata", [
    {"part": "decoder"},                                                   # no config
    {"part": "decoder", "config": "{not json"},
    {"part": "decoder", "config": '{"n_init": 128, "n_hid": 256, "n_blk_per_group": 2, "output_channels": 3, '
                                  '"vocab_size": 8192, "requires_grad": true}'},   # a key of its own
    {"part": "decoder", "config": '{"n_init": 128, "n_hid": 1000000, "n_blk_per_group": 2, '
                                  '"output_channels": 3, "vocab_size": 8192}'},    # a huge model
    {"part": "decoder", "config": '{"n_init": 128, "n_hid": 2.5, "n_blk_per_group": 2, '
                                  '"output_channels": 3, "vocab_size": 8192}'},
], ids=["missing", "not-json", "extra-key", "huge", "not-whole"])
def test_a_safetensors_dvae_whose_config_is_not_its_own_is_a_clear_error(tmp_path, metadata):
    """Its config is read before its weights are checked against it: one that is missing, not
    JSON, with other keys or sizes far past OpenAI's is a one-line ModelLoadError naming the file,
    built into no model. Before: KeyError, JSONDecodeError or TypeError tracebacks, or a model of
    10^12 weights built first."""
    from safetensors.torch import save_file

    path = tmp_path / "decoder.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(m.ModelLoadError, match="has no valid config") as err:
        m.load_dvae("decoder", str(path))
    assert str(path) in str(err.value)
