"""Shared fixtures: tiny real models (random init, a real tokenizer), databases, Chromium.

The tiny models here are for unit tests of the machinery (shapes, padding, LoRA, losses).
Tests of what alignment achieves use the embedded world's trained models instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: see alignloop/cli.py

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "ALIGNLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

WORDS = (
    "the a dog cat is are was good bad great terrible product this that it i you we they "
    "what how why when where do does can should my your our house hot cold fan open window "
    "summary dialogue person said says wants to of and or not no yes please thanks sorry "
    "polite toxic garbage awesome incredible helpful harmless honest answer question . , ? !"
).split()


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer GPT-2 with a word-level tokenizer, saved as an HF folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _tokenizer(path)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A randomly initialised tiny T5 (seq2seq) with a word-level tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    tok = _tokenizer(path)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A randomly initialised tiny RoBERTa classifier with labels nothate/hate."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-roberta")
    tok = _tokenizer(path)
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=130,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        num_labels=2,
        id2label={0: "nothate", 1: "hate"},
        label2id={"nothate": 0, "hate": 1},
    )
    RobertaForSequenceClassification(cfg).save_pretrained(path)
    return path


@pytest.fixture()
def cli(capsys):
    """Run ``alignloop ARGS`` in-process; returns ``(exit_code, stdout, stderr)``."""
    from alignloop.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def run_alignloop(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``alignloop ARGS`` as a real subprocess (for start-up, kill and resume tests)."""
    return subprocess.run(
        [sys.executable, "-m", "alignloop", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh database URL: SQLite in a temp folder, or a fresh schema on the PostgreSQL server.

    In CI (``CI`` set) a PostgreSQL server that cannot be reached is a failure, not a skip.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'labels.db'}"
        return
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable at {POSTGRES_URL} (required in CI)")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    plain = POSTGRES_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium binary. In CI its absence is a failure; locally a skip with the fix."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium not installed (apt-get install -y chromium)")
        pytest.skip("chromium not installed: apt-get update && apt-get install -y chromium")
    return path


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture()
def browser(chromium_path):
    """A Playwright Chromium browser driving Debian's chromium (no download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield b
        b.close()


# Names that once broke the reports (matplotlib parsed "$...$" as mathtext): each must be shown
# as typed, and the 200-character one must not overlap anything.
HOSTILE_NAMES = ["$\\x$", "$a$ $b$", "\\n", "line\nbreak", "L" + "o" * 197 + "ng"]


@pytest.fixture()
def hostile_names() -> list[str]:
    """:data:`HOSTILE_NAMES`: ``$\\x$``, ``$a$ $b$``, a literal ``\\n``, a real newline, 200 characters."""
    return list(HOSTILE_NAMES)


@pytest.fixture()
def text_overlaps():
    """``text_overlaps(fig)``: pairs of visible texts of a matplotlib figure whose drawn boxes
    overlap (by more than a pixel each way), after drawing it as the reports save it. Two numbers
    (an x and a y tick label meeting at an axes corner) are matplotlib's own layout, not counted."""

    def number(text: str) -> bool:
        try:
            float(text.replace("\u2212", "-"))
            return True
        except ValueError:
            return False

    def find(fig) -> list[tuple[str, str]]:
        from matplotlib.text import Text

        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [
            (t.get_text(), t.get_window_extent(renderer))
            for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip()
        ]
        out = []
        for i, (a, ba) in enumerate(boxes):
            for b, bb in boxes[i + 1 :]:
                w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
                h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
                if w > 1 and h > 1 and not (number(a) and number(b)):
                    out.append((a, b))
        return out

    return find


@pytest.fixture()
def app_login():
    """``app_login(client, token) -> csrf``: log an HTTP client (TestClient or httpx) in as a
    browser does: open the login link (the confirmation page), post its form from the same
    origin; returns the session's CSRF token (read from the next page's forms)."""
    import re

    def login(client, token: str, origin: str = "http://testserver") -> str:
        page = client.get("/login", params={"token": token})
        assert page.status_code == 200, page.text[:300]
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
        r = client.post(
            "/login",
            data={"token": token, "nonce": nonce},
            headers={"Origin": origin},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text[:300]
        home = client.get("/", follow_redirects=True)
        found = re.search(r'name="csrf_token" value="([^"]+)"', home.text)
        assert found, home.text[:300]
        return found.group(1)

    return login


def store_dump(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the labelling store, in primary-key order: "nothing changed"
    is ``store_dump(db)`` before == after."""
    from sqlalchemy import select

    from alignloop.feedback import store as st
    from alignloop.feedback.models import Base

    engine = st.open_store(db_url)
    out = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


@pytest.fixture()
def dump():
    """:func:`store_dump` as a fixture (test modules cannot import a conftest by name safely)."""
    return store_dump
