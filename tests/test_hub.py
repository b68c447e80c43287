"""Hub ids when the hub cannot be reached: one line, at once (issue 22)."""

from __future__ import annotations

import socket
import time

import pytest

from alignloop import hub
from alignloop.errors import UserError


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub's endpoint is a local port nobody listens on (no network needed either way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def test_an_uncached_hub_model_fails_at_once_saying_how_to_go_local(unreachable_hub):
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        hub.require_hub("nobody/no-such-model-xyz", "model")
    assert time.perf_counter() - t < 1.0
    line = e.value.line()
    assert (
        "'nobody/no-such-model-xyz' is not in the local cache" in line
        and "127.0.0.1 cannot be reached" in line
    )
    assert "local HF model folder" in line and "\n" not in line


def test_offline_setting_is_honoured_and_datasets_point_at_files(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        hub.require_hub("nobody/no-such-dataset-xyz", "dataset")
    assert "HF_DATASETS_OFFLINE is set" in e.value.line() and "local JSONL/CSV/Parquet file" in e.value.line()


def test_local_paths_and_world_models_never_ask_the_hub(unreachable_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("world:base", "world:toxicity:nothate", str(tmp_path), "./model", "runs/typo"):
        hub.require_hub(name)  # not hub ids: the loader reports a missing path itself


def test_the_cli_fails_in_one_line_without_retries(cli, tmp_path, unreachable_hub):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "1", "prompt": "hello"}\n')
    code, _, err = cli("generate", "--model", "nobody/no-such-model-xyz", "--prompts", prompts, "--out",
                       tmp_path / "s.jsonl")  # fmt: skip
    # one line, and no retry loop (its wall time is the loaded machine's: the probe is timed above)
    assert code == 2 and err.count("\n") == 1 and "Retrying" not in err, err
    assert "is not in the local cache" in err
