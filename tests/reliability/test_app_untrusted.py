"""Untrusted text in real Chromium: prompts, completions, set ids, instructions, criteria and
labeller names carrying script, event-handler and markup payloads are shown as text on every
page of the labelling app and in the HTML feedback report: no dialog opens, no payload runs,
and no request goes anywhere a payload points.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignloop.feedback import loadtest
from alignloop.feedback import store as st
from alignloop.records import CompletionSet

pytestmark = pytest.mark.browser

TRAP = "http://127.0.0.1:9/pwned"  # any request whose URL contains "pwned" is a failure
PAYLOADS = [
    "<script>alert('script')</script>",
    "<img src=x onerror=alert('onerror')>",
    "<svg onload=alert('svg')>",
    f'"><img src="{TRAP}-img">',
    f'</pre><iframe src="{TRAP}-frame"></iframe>',
    f"<style>@import '{TRAP}-css';</style>",
    f'<meta http-equiv="refresh" content="0;url={TRAP}-meta">',
    f'<a href="{TRAP}-link" id="evil">click</a>',
    "javascript:alert('js-url')",
    "{{7*7}} ${7*7} <%= 7*7 %>",
]
INSTRUCTIONS = (
    "# Rank them\n\n"
    + "\n\n".join(PAYLOADS)
    + f"\n\n[a javascript link](javascript:alert('md'))\n\n![an image]({TRAP}-md-img)\n\n<{TRAP}-autolink>"
)


def watch(page) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"dialogs": [], "requests": [], "errors": []}
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    return seen


def assert_inert(page, seen: dict[str, list[str]]) -> None:
    page.wait_for_timeout(300)  # give a payload's timers and loads a chance to fire
    assert seen["dialogs"] == []
    assert [u for u in seen["requests"] if "pwned" in u] == []
    # (the report's own CSP is a meta tag; a payload's <meta http-equiv=refresh> would not be)
    made = "iframe, svg, meta[http-equiv]:not([http-equiv='Content-Security-Policy']), #evil"
    assert page.evaluate(f'document.querySelectorAll("{made}").length') == 0
    assert page.evaluate("[...document.scripts].every(s => s.src !== '' || s.textContent.trim() === '')")


def test_payloads_are_text_in_every_page_and_in_the_report(tmp_path, browser, cli):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    st.create_project(db, criterion=PAYLOADS[0], instructions=INSTRUCTIONS, per_set=3)
    sets = [
        CompletionSet(
            prompt_id=f"set {i} {PAYLOADS[i]}",
            prompt=PAYLOADS[i],
            completions=[
                {"id": f"c{j} {PAYLOADS[j]}", "text": PAYLOADS[(i + j) % len(PAYLOADS)]} for j in range(4)
            ],
        )
        for i in range(3)
    ]
    st.import_sets(db, sets)
    names = [PAYLOADS[1], PAYLOADS[3], PAYLOADS[7]]
    tokens = [st.invite(db, n)["token"] for n in names]
    # two of them label everything through the store, so the admin page and report have data
    for tok in tokens[1:]:
        lid = st.authenticate(db, tok).id
        while (a := st.next_assignment(db, lid)) is not None:
            ranks = {c["id"]: i + 1 for i, c in enumerate(a["completions"])}
            st.submit(db, lid, a["assignment_id"], f"submission-{lid}-{a['assignment_id']}", ranks=ranks)
    admin = st.create_admin(db, name=PAYLOADS[2])["token"]
    st.close_store(db)

    port = loadtest.free_port()
    base = f"http://127.0.0.1:{port}"
    server = loadtest.start_server(db, port)
    try:
        page = browser.new_page()
        seen = watch(page)
        page.goto(f"{base}/login?token={tokens[0]}")
        page.click("#login")  # the link asks first; the POST logs in
        page.wait_for_url(lambda url: "/login" not in url)
        assert page.url.endswith("/instructions")
        text = page.locator("#instructions").inner_text()
        for p in PAYLOADS[:3]:
            assert p in text  # the raw HTML of the Markdown is shown, not run
        assert page.locator("#instructions a[href^='javascript']").count() == 0
        assert page.locator("header .who").text_content() == names[0]
        assert_inert(page, seen)
        page.click("#acknowledge")
        page.wait_for_url("**/label")
        assert page.locator("#prompt").text_content() in PAYLOADS
        cards = page.locator("li.card pre.text").all_text_contents()
        assert len(cards) == 4 and all(c in PAYLOADS for c in cards)
        assert page.locator("pre.text *").count() == 0
        assert_inert(page, seen)
        page.close()

        page = browser.new_page()
        seen = watch(page)
        page.goto(f"{base}/login?token={admin}")
        page.click("#login")  # the link asks first; the POST logs in
        page.wait_for_url(lambda url: "/login" not in url)
        page.wait_for_url("**/admin")
        body = page.locator("body").inner_text()
        for n in names:
            assert n in body
        assert sets[0].prompt_id in body
        assert_inert(page, seen)
        page.close()
    finally:
        loadtest.stop_server(server)

    out = tmp_path / "report"
    code, _, err = cli("feedback", "report", "--db", db, "--out", out)
    assert code == 0, err
    html = Path(out / "report.html")
    page = browser.new_page()
    seen = watch(page)
    page.goto(html.as_uri())
    body = page.locator("body").inner_text()
    for n in names[1:]:
        assert n in body  # the labellers' names, as text
    assert_inert(page, seen)
    assert [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []
    page.close()
    st.close_store(db)
