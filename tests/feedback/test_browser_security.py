"""Sessions, login CSRF, downloads and the API page in real Chromium against a live server."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from alignloop.feedback import store as st
from alignloop.records import CompletionSet

# sessions behave alike on both databases (tests/feedback/test_sessions.py): SQLite is enough here
pytestmark = [pytest.mark.browser, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def sets(n: int = 3) -> list[CompletionSet]:
    return [
        CompletionSet(
            prompt_id=f"s{i}",
            prompt=f"Prompt {i}?",
            completions=[{"id": f"c{j}", "text": f"t{j}"} for j in range(3)],
        )
        for i in range(n)
    ]


def log_in(page, link: str) -> None:
    page.goto(link)
    page.click("#login")
    page.wait_for_url(lambda url: "/login" not in url)


def me(base: str, cookies: list[dict]) -> int:
    """GET /api/me from outside the browser with the browser's cookies (a stolen copy)."""
    jar = {c["name"]: c["value"] for c in cookies}
    return httpx.get(f"{base}/api/me", cookies=jar).status_code


def test_logout_makes_the_session_unusable_on_the_server(db, live_server, browser):
    st.create_project(db, per_set=1)
    st.import_sets(db, sets())
    context = browser.new_context()
    page = context.new_page()
    log_in(page, st.invite(db, "ada", base_url=live_server)["link"])
    copied = context.cookies()
    assert [c["name"] for c in copied] == [
        n for n in (c["name"] for c in copied) if n.startswith("alignloop-")
    ]
    assert me(live_server, copied) == 200
    page.click("header button:text('Log out')")
    page.wait_for_selector("#message")
    assert me(live_server, copied) == 401  # the copy is dead too, not only the browser's cookie
    page.goto(f"{live_server}/instructions")
    assert "needs your login link" in page.inner_text("body")
    context.close()


def test_a_revoked_labellers_open_session_stops_at_once(db, live_server, browser):
    st.create_project(db, per_set=1)
    st.import_sets(db, sets())
    ada = browser.new_context()
    page = ada.new_page()
    log_in(page, st.invite(db, "ada", base_url=live_server)["link"])
    page.click("#acknowledge")
    page.wait_for_selector("li.card")
    # the admin revokes her from the admin page, in another browser
    admin = browser.new_context()
    apage = admin.new_page()
    log_in(apage, st.create_admin(db, base_url=live_server)["link"])
    apage.click("#labellers tr:has-text('ada') button:text('Revoke')")
    apage.wait_for_selector("#notice")
    # her open page can no longer submit, and the next page load is refused
    page.locator("li.card").first.click()
    for key in ("1", "2", "3", "Enter"):
        page.keyboard.press(key)
    expect(page.locator("#error")).to_contain_text(
        "Not saved"
    )  # the app's CSP forbids eval: no wait_for_function
    assert "revoked" in page.inner_text("#error")
    assert st.load_labels(db)[1] == []
    page.reload()
    assert "needs your login link" in page.inner_text("body")
    ada.close()
    admin.close()


def test_a_foreign_page_cannot_change_who_is_logged_in(db, live_server, browser):
    """Login CSRF: mallory's page sends ada's browser to mallory's login link (a navigation) and
    posts mallory's token to /login with a nonce mallory got for herself. Ada stays ada."""
    st.create_project(db, per_set=1)
    st.import_sets(db, sets())
    ada_link = st.invite(db, "ada", base_url=live_server)["link"]
    mallory = st.invite(db, "mallory", base_url=live_server)["token"]
    own = httpx.get(f"{live_server}/login", params={"token": mallory}).text  # mallory's own nonce
    nonce = own.split('name="nonce" value="', 1)[1].split('"', 1)[0]
    context = browser.new_context()
    evil = {
        "http://evil.test/post": f"""<form method="post" action="{live_server}/login">
            <input name="token" value="{mallory}"><input name="nonce" value="{nonce}"></form>
            <script>document.forms[0].submit()</script>""",
        "http://evil.test/go": f"<script>location = '{live_server}/login?token={mallory}'</script>",
    }
    context.route(
        "http://evil.test/**",
        lambda route: route.fulfill(content_type="text/html", body=evil[route.request.url]),
    )
    page = context.new_page()
    log_in(page, ada_link)

    def who() -> str:
        page.goto(f"{live_server}/api/me")
        return page.evaluate("JSON.parse(document.body.innerText).name")

    assert who() == "ada"
    page.goto("http://evil.test/post")
    page.wait_for_url(f"{live_server}/login")
    assert "Login refused" in page.inner_text("body")
    assert who() == "ada"
    page.goto("http://evil.test/go")
    page.wait_for_url(f"{live_server}/login?token=*")
    assert "This browser is logged in as ada" in page.inner_text("#login-current")  # it asks; nothing changed
    assert who() == "ada"
    context.close()


def test_exports_download_with_the_projects_name(db, live_server, browser):
    names = ["日本語", 'a"b', "a\r\nb"]
    for name in names:
        st.create_project(db, name, per_set=1)
        st.import_sets(db, sets(1), project=name)
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    log_in(page, st.create_admin(db, base_url=live_server)["link"])
    got = []
    for name in names:
        page.goto(f"{live_server}/admin?" + httpx.QueryParams({"project": name}).__str__())
        with page.expect_download() as download:
            page.click("a:text-is('sets')")
        got.append(download.value.suggested_filename)
    print("\nChromium's file names:", got)
    # exact where the file system allows it (Chromium turns a quote into "_" itself); CR/LF -> "_"
    assert got == ["日本語-sets.jsonl", "a_b-sets.jsonl", "a__b-sets.jsonl"]
    context.close()


def test_the_api_page_renders_from_the_app_without_csp_violations(db, live_server, browser):
    st.create_project(db, per_set=1)
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(live_server) else None)
    log_in(page, st.create_admin(db, base_url=live_server)["link"])
    page.click("#nav-api")
    page.wait_for_selector(".opblock")
    ops = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/next" in ops and "/api/admin/export" in ops and len(ops) >= 15
    assert problems == [] and outside == []
    assert "script-src 'self'" in httpx.get(f"{live_server}/docs").headers["content-security-policy"]
    context.close()
