"""report.html: self-contained, every plot present, all outside text escaped (also in Chromium)."""

from __future__ import annotations

import json
import re

import pytest

from alignloop.evaluation.report import read_training_log, training_series, write_report

SCRIPT = "<script>alert('x')</script>"
IMG = '<img src=x onerror="alert(1)">'


def _evaluation(beacon: str = "http://127.0.0.1:9/beacon.png") -> dict:
    bad_name = f"ppo {SCRIPT}"
    metric = lambda m: {"mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1, "n": 10}  # noqa: E731
    return {
        "baseline": "base",
        "metric_names": ["reward", "toxicity", "kl_per_token"],
        "policies": {
            "base": {
                "model": "world:base",
                "metrics": {"reward": metric(0.1), "toxicity": metric(0.4), "kl_per_token": metric(0.0)},
            },
            bad_name: {
                "model": IMG,
                "metrics": {"reward": metric(0.9), "toxicity": metric(0.1), "kl_per_token": metric(0.2)},
            },
        },
        "differences": {
            bad_name: {
                "reward": {
                    "diff": 0.8,
                    "ci_low": 0.6,
                    "ci_high": 1.0,
                    "pct_change": 800.0,
                    "pct_ci_low": 500.0,
                    "pct_ci_high": 900.0,
                },
                "toxicity": {
                    "diff": -0.3,
                    "ci_low": -0.4,
                    "ci_high": -0.2,
                    "pct_change": -75.0,
                    "pct_ci_low": -80.0,
                    "pct_ci_high": -70.0,
                },
            }
        },
        "overoptimization": {
            "best_of_n": [
                {"n": n, "sqrt_kl": s, "kl": s * s, "proxy": p, "gold": g}
                for n, s, p, g in [(1, 0, 0, 0), (2, 0.4, 0.5, 0.3), (4, 0.7, 0.9, 0.2)]
            ],
            "series": {
                bad_name: [
                    {"step": 10, "sqrt_kl": 0.5, "kl": 0.25, "proxy": 0.6, "gold": 0.4},
                    {"step": 20, "sqrt_kl": 1.0, "kl": 1.0, "proxy": 1.2, "gold": 0.1},
                ]
            },
            "peaks": {bad_name: {"step": 10, "sqrt_kl": 0.5, "proxy": 0.6, "gold": 0.4}},
        },
        "samples": [
            {
                "prompt": f"tell me {SCRIPT}",
                "completions": {"base": IMG, bad_name: f'<img src="{beacon}"> & fine'},
            },
        ],
        "settings": {"prompts": 10, "samples_per_prompt": 4, "seeds": [0]},
    }


def _training_run(tmp_path):
    run = tmp_path / "ppo-run"
    run.mkdir()
    rows = [
        {
            "step": i,
            "score": 0.1 * i,
            "kl": 0.01 * i,
            "entropy": 2 - 0.1 * i,
            "policy_loss": 0.5 / (i + 1),
            "value_loss": 1 / (i + 1),
            "note": "x",
        }
        for i in range(8)
    ]
    text = (
        "\n".join(json.dumps(r) for r in rows) + '\n{"step": 9, "kl": NaN}\n{"step": 10, "kl": "bad"}\n{torn'
    )
    (run / "metrics.jsonl").write_text(text)
    return run


def test_report_is_self_contained_and_escaped(tmp_path):
    run = _training_run(tmp_path)
    path = write_report(tmp_path / "out", _evaluation(), {f"ppo {SCRIPT}": run})
    page = path.read_text()
    assert "<script" not in page.lower()
    assert 'onerror="' not in page  # only escaped (onerror=&quot;) as text inside <pre>
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    # every image is inline: bars, over-optimization, and 4 training groups (reward, KL, entropy, loss)
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(http|//)', page)
    assert "Content-Security-Policy" in page
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) == 6
    assert "gold peaks at sqrt(KL) = 0.50" in page


def test_training_log_read_defensively(tmp_path):
    rows = read_training_log(_training_run(tmp_path))
    assert len(rows) == 10  # the torn line is skipped
    series = training_series(rows, ["kl", "note"])
    assert len(series["kl"]) == 8  # NaN and "bad" are not drawn
    assert "note" not in series
    assert read_training_log(tmp_path / "nowhere") == []


def test_report_with_nothing_but_policies(tmp_path):
    ev = {"policies": {"base": {"metrics": {}}}, "metric_names": []}
    page = write_report(tmp_path, ev).read_text()
    assert "no samples" in page and "<img" not in page


@pytest.mark.browser
def test_report_in_chromium_offline(tmp_path, browser):
    run = _training_run(tmp_path)
    path = write_report(tmp_path / "out", _evaluation(), {"ppo": run})
    context = browser.new_context(offline=True)
    page = context.new_page()
    dialogs, requests = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    loaded = page.evaluate("() => Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * 6
    shot = page.screenshot(full_page=True, path=str(tmp_path / "report.png"))
    assert len(shot) > 10_000
    assert dialogs == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert page.evaluate("() => document.querySelectorAll('script').length") == 0
    text = page.inner_text("body")
    assert SCRIPT in text and IMG in text  # shown as text, literally
    context.close()
