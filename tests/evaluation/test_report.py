"""report.html: self-contained, every plot present, all outside text escaped (also in Chromium)."""

from __future__ import annotations

import functools
import html
import json
import re

import pytest
from matplotlib.text import Text

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


def _named(names: list[str]) -> dict:
    """An evaluation of policies called ``names`` (the first is the baseline)."""
    metric = lambda m: {"mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1, "n": 10}  # noqa: E731
    return {
        "baseline": names[0],
        "metric_names": ["reward", "toxicity"],
        "policies": {
            n: {"metrics": {"reward": metric(0.1 * i), "toxicity": metric(0.5)}} for i, n in enumerate(names)
        },
        "differences": {
            n: {"reward": {"diff": 0.1 * i, "ci_low": 0.0, "ci_high": 0.2}} for i, n in enumerate(names) if i
        },
        "overoptimization": {
            "series": {
                n: [
                    {"step": 1, "sqrt_kl": 0.5, "proxy": 0.2 + 0.1 * i, "gold": 0.2},
                    {"step": 2, "sqrt_kl": 1.0 + 0.1 * i, "proxy": 0.8, "gold": 0.1 * i},
                ]
                for i, n in enumerate(names)
            }
        },
        "samples": [{"prompt": "p", "completions": {n: "c" for n in names}}],
    }


def test_hostile_policy_names_are_drawn_as_typed_without_overlap(tmp_path, hostile_names, text_overlaps):
    from alignloop.evaluation.report import bars_figure, overoptimization_figure, training_figures

    names = ["base", *hostile_names]
    run = _training_run(tmp_path)
    path = write_report(tmp_path / "out", _named(names), {n: run for n in hostile_names})
    page = path.read_text()
    for n in names:  # whole and escaped in the tables
        assert f"<th>{html.escape(n)}</th>" in page
    figures = [bars_figure(_named(names)), overoptimization_figure(_named(names)["overoptimization"])]
    figures += [f for _, f in training_figures({n: run for n in hostile_names})]
    for fig in figures:
        texts = [t.get_text() for t in fig.findobj(Text)]
        assert "$\\x$" in texts or any("$\\x$" in t for t in texts)  # as typed, "$" and backslash kept
        assert not any("\n" in t for t in texts)  # a newline in a name is drawn as "\n"
        assert text_overlaps(fig) == []


def test_hostile_names_through_the_evaluate_command(cli, tiny_gpt2, tmp_path, hostile_names):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the dog is"}) + "\n")
    policies = [a for n in hostile_names for a in ("--policy", f"{n}={tiny_gpt2}")]
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate", *policies, "--prompts", prompts, "--toxicity", "none", "--samples", "1",
        "--max-new-tokens", "3", "--out", out, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert list(json.loads((out / "metrics.json").read_text())["policies"]) == hostile_names
    page = (out / "report.html").read_text()
    assert all(html.escape(n) in page for n in hostile_names)


def _csp_violation(found: list, message) -> None:
    if "Content Security Policy" in message.text:
        found.append(message.text)


@pytest.mark.browser
def test_hostile_names_in_chromium_no_overlap(tmp_path, browser, hostile_names):
    """Both reports in Chromium (screenshots kept next to them): names as typed, nothing wider
    than the page, no two table cells on top of each other."""
    from alignloop.preference.report import feedback_report
    from alignloop.preference.report import write_report as write_feedback
    from alignloop.records import CompletionSet, Ranking

    sets = [
        CompletionSet(
            prompt_id=f"s{i}", prompt="?", completions=[{"id": f"c{j}", "text": "t"} for j in range(3)]
        )
        for i in range(4)
    ]
    rankings = [
        Ranking(
            set_id=s.prompt_id,
            labeller=n,
            ranks={"c0": 1 + (i + k) % 3, "c1": 1 + (i + k + 1) % 3, "c2": 1 + (i + k + 2) % 3},
        )
        for k, n in enumerate(hostile_names)
        for i, s in enumerate(sets)
    ]
    pages = [
        write_report(
            tmp_path / "eval",
            _named(["base", *hostile_names]),
            dict.fromkeys(hostile_names, _training_run(tmp_path)),
        ),
        write_feedback(feedback_report(sets, rankings), tmp_path / "feedback")["html"],
    ]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    for path in pages:
        page = context.new_page()
        violations: list[str] = []
        page.on("console", functools.partial(_csp_violation, violations))
        page.goto(path.as_uri())
        page.screenshot(full_page=True, path=str(path.with_suffix(".png")))
        text = page.inner_text("body")
        assert all(n in text for n in hostile_names if "\n" not in n), path
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), path
        cells = page.evaluate(
            "() => Array.from(document.querySelectorAll('td,th,img,p,h1,h2')).map(e => {"
            " const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom, e.tagName]; })"
        )
        for i, a in enumerate(cells):
            for b in cells[i + 1 :]:
                w = min(a[2], b[2]) - max(a[0], b[0])
                h = min(a[3], b[3]) - max(a[1], b[1])
                nested = a[4] == "P" and b[4] in ("IMG",) or b[4] == "P" and a[4] in ("IMG",)
                assert not (w > 1 and h > 1) or nested, (path.name, a, b)
        assert violations == []
        page.close()
    context.close()


def _demo_like() -> tuple[dict, dict]:
    """An evaluation shaped like the demo's (4 policies, 24 metrics, long samples) and the
    reward-hacking warnings its training runs recorded."""
    names = ["base", "ppo", "ppo-beta0", "dpo"]
    means = {  # base, ppo, ppo-beta0, dpo
        "rate_toxic": (0.284, 0.016, 0.0, 0.085), "f_rate": (0.028, 0.094, 0.960, 0.019),
        "gold_score": (0.439, 0.662, -0.930, 0.776), "toxicity": (0.284, 0.014, 0.001, 0.086),
        "reward": (0.077, 2.441, 3.372, 1.565),
    }  # fmt: skip
    rest = ["gold_helpful", "gold_honest", "gold_harmless", "expected_max_toxicity", "toxicity_probability",
            "kl_per_token", "kl_sequence", "distinct_1", "distinct_2", "mean_length", "rate_contradicts_user",
            "rate_exaggerated", "rate_harmful_compliance", "rate_misbehaviour", "rate_myth_confirmed",
            "rate_off_topic_part", "rate_over_refusal", "rate_unhelpful", "rate_wrong_fact"]  # fmt: skip
    metric_names = [*means, *rest]
    value = lambda k, i: means[k][i] if k in means else 0.1 * (i + 1)  # noqa: E731
    policies = {
        n: {"metrics": {k: {"mean": value(k, i), "ci_low": value(k, i) - 0.01, "ci_high": value(k, i) + 0.01}
                        for k in metric_names}}
        for i, n in enumerate(names)
    }  # fmt: skip
    diffs = {}
    for i, n in enumerate(names[1:], start=1):
        diffs[n] = {}
        for k in metric_names:
            d = value(k, i) - value(k, 0)
            pct = 100 * d / abs(value(k, 0)) if value(k, 0) else None
            noise = 0.05 if (n, k) == ("dpo", "f_rate") else 0.01  # dpo's F rate: within noise
            diffs[n][k] = {"diff": d, "ci_low": d - noise, "ci_high": d + noise, "pct_change": pct,
                           "mean_before": value(k, 0), "mean_after": value(k, i)}  # fmt: skip
    long = " ".join(["a-very-long-completion-without-spaces" * 3] * 20)
    evaluation = {
        "baseline": "base", "metric_names": metric_names, "policies": policies, "differences": diffs,
        "samples": [{"prompt": "tell me " * 30, "completions": dict.fromkeys(names, long)}] * 3,
        "by_family": {"harmful": {"prompts": 20, "policies": {n: {"rate_toxic": {"mean": 0.1}} for n in names}}},
        "settings": {"prompts": 100, "samples_per_prompt": 8, "seeds": [1234]},
    }  # fmt: skip
    flags = {"ppo-beta0": {"proxy_vs_heldout": 46, "kl_over_target": 39}}
    return evaluation, flags


def test_headline_says_what_improved_what_got_worse_and_names_the_rates():
    from alignloop.evaluation.report import headline

    evaluation, flags = _demo_like()
    sentences = headline(evaluation, flags)
    assert 2 <= len(sentences) <= 5
    ppo, beta0, dpo, hacking = sentences
    assert ppo == (
        "Compared with base, ppo lowered the toxic rate from 28.4% to 1.6% and raised the gold judge score "
        "from 0.439 to 0.662, but raised the F rate (nonsense) from 2.8% to 9.4%."
    )
    assert "raised the F rate (nonsense) from 2.8% to 96.0%" in beta0 and "to -0.930" in beta0
    assert "left the F rate (nonsense) within noise (2.8% before, 1.9% after)" in dpo
    assert (
        hacking
        == "Reward hacking was flagged during training of ppo-beta0 (proxy_vs_heldout x46, kl_over_target x39)."
    )
    assert headline(evaluation, {})[-1] == "No reward-hacking warning fired during training."
    assert len(headline(evaluation, None)) == 3  # not known: not claimed


def test_changes_are_points_for_rates_and_relative_only_where_it_means_something():
    from alignloop.evaluation.report import show_change

    d = {"diff": -0.268, "ci_low": -0.306, "ci_high": -0.229, "pct_change": -94.3}
    assert show_change("rate_toxic", d, 0.284).startswith("-26.8 pts")  # points, no %
    assert "%" not in show_change("rate_toxic", d, 0.284)
    assert show_change("toxicity", d, 0.284).endswith("(-94%)")  # a ratio-scale quantity
    assert "%" not in show_change("toxicity", {**d, "pct_change": 1630.8}, 0.001)  # from ~0: meaningless
    assert "%" not in show_change("gold_score", {**d, "pct_change": 50.0}, 0.439)  # can be negative


@pytest.mark.browser
def test_demo_report_fits_1280px_and_opens_with_its_headline(tmp_path, browser):
    from alignloop.evaluation import report

    evaluation, flags = _demo_like()
    runs = {}
    for name, warns in flags.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"warnings": warns}))
        runs[name] = tmp_path / name
    path = write_report(tmp_path / "out", evaluation, runs)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(path.as_uri())
    page.screenshot(path=str(tmp_path / "report-1280.png"))
    assert page.evaluate(
        "() => document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth"
    )
    text = page.inner_text("#headline")
    assert "the toxic rate from 28.4% to 1.6%" in text and "the F rate (nonsense) from 2.8% to 9.4%" in text
    assert text == " ".join(report.headline(evaluation, report.hacking_flags(runs)))
    # the key metrics first, every metric folded below
    first = page.inner_text("table >> nth=0")
    assert first.splitlines()[1].startswith("rate: toxic") and "distinct-1" not in first
    assert page.locator("details summary").first.inner_text() == "all 24 metrics"
    context.close()


def test_warnings_section_lists_every_run_s_warnings_counted_with_first_and_last_step(tmp_path):
    """Issue 27: the report lists the reward-hacking warnings the training runs logged, not only the console."""
    runs = {}
    logs = {
        "ppo": [{"step": s, "warnings": []} for s in range(5)],
        "ppo-beta0": [
            {"step": 0, "warnings": []},
            {"step": 1, "warnings": ["KL 9.00 is over 4x the target 1"], "warning_kinds": ["kl_over_target"]},
            {
                "step": 2,
                "warnings": ["KL 12.00 is over 4x the target 1"],
                "warning_kinds": ["kl_over_target"],
            },
            {"step": 3, "warnings": ["old-style message"]},  # a log from before warning_kinds
        ],
    }
    for name, rows in logs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = tmp_path / name
    page = write_report(tmp_path / "out", _evaluation(), runs).read_text()
    section = page[page.index('<section id="warnings">') :]
    section = section[: section.index("</section>")]
    assert (
        "<td>ppo-beta0</td><td>kl_over_target</td><td class='num'>2</td><td class='num'>1</td><td class='num'>2</td>"
        in section
    )
    assert "KL 12.00 is over 4x the target 1" in section and "old-style message" in section
    assert "No reward-hacking warning during training of ppo." in section
