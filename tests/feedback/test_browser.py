"""The labelling pages in real Chromium (Playwright + Debian's chromium) against a live server."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from alignloop.feedback import store as st
from alignloop.records import CompletionSet

pytestmark = pytest.mark.browser


def four(prefix: str, prompt: str) -> CompletionSet:
    return CompletionSet(
        prompt_id=prefix,
        prompt=prompt,
        completions=[{"id": f"c{j}", "text": f" completion {j} of {prefix}"} for j in range(4)],
    )


def test_labeller_ranks_by_keyboard_and_by_drag_and_drop(db, live_server, browser):
    st.create_project(db, per_set=1)
    st.import_sets(db, [four("s1", "First prompt?"), four("s2", "Second prompt?")])
    link = st.invite(db, "ada", base_url=live_server)["link"]
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # log in by link: the instructions come first
    page.goto(link)
    page.click("#login")  # the link asks first; the POST logs in
    page.wait_for_url(lambda url: "/login" not in url)
    assert page.url.endswith("/instructions")
    assert "sparingly" in page.locator("#instructions").inner_text()
    page.click("#acknowledge")
    page.wait_for_url("**/label")
    assert page.locator("#prompt").inner_text() == "First prompt?"
    assert page.locator("#progress").inner_text() == "Done 0 of 2"

    # set 1 by keyboard: c0=1, c1=2, c2=2 (a tie), c3=F; a wrong key is undone with U
    page.locator("li.card").first.click()
    page.keyboard.press("1")
    page.keyboard.press("3")
    page.keyboard.press("u")
    page.keyboard.press("2")
    page.keyboard.press("2")
    page.keyboard.press("Enter")  # not everything ranked yet: refused in the page
    assert "#4 still open" in page.locator("#error").inner_text()
    page.keyboard.press("f")
    badges = page.locator("li.card .badge").all_inner_texts()
    assert badges == ["1", "2", "2", "F"]
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_text("Second prompt?")

    # the tie rate is now 100%: a gentle warning
    assert "sparingly" in page.locator("#tie-warning").inner_text()
    assert page.locator("#progress").inner_text() == "Done 1 of 2"

    # set 2 by drag and drop: c3 to the top, then c0 below c1 -> c3, c1, c0, c2
    page.drag_and_drop("li.card[data-cid=c3]", "li.card[data-cid=c0]")
    assert [c.get_attribute("data-cid") for c in page.locator("li.card").all()] == ["c3", "c0", "c1", "c2"]
    page.drag_and_drop("li.card[data-cid=c0]", "li.card[data-cid=c1]")
    order = [c.get_attribute("data-cid") for c in page.locator("li.card").all()]
    assert order == ["c3", "c1", "c0", "c2"]
    assert page.locator("li.card .badge").all_inner_texts() == ["1", "2", "3", "4"]
    page.click("#submit")
    page.wait_for_selector("#all-done")
    assert errors == []

    _, rankings, _ = st.load_labels(db)
    got = {r.set_id: (r.labeller, r.ranks) for r in rankings}
    assert got == {
        "s1": ("ada", {"c0": 1, "c1": 2, "c2": 2, "c3": "F"}),
        "s2": ("ada", {"c3": 1, "c1": 2, "c0": 3, "c2": 4}),
    }
    # the instructions stay one click away
    page.click("#nav-instructions")
    assert "sparingly" in page.locator("#instructions").inner_text()
    page.close()


def test_script_and_onerror_payloads_are_shown_as_text(db, live_server, browser):
    st.create_project(db, per_set=1)
    payloads = [
        "<script>window.__pwned = 1</script>",
        '<img src=x onerror="window.__pwned = 2">',
        "  keeps   spaces\n\tand a tab\n",
        '"><svg onload="window.__pwned = 3">',
    ]
    st.import_sets(
        db,
        [
            CompletionSet(
                prompt_id="xss",
                prompt="<b>not bold</b>\n  second line",
                completions=[{"id": f"c{i}", "text": t} for i, t in enumerate(payloads)],
            )
        ],
    )
    tok = st.invite(db, "<img src=x onerror=alert(1)>", base_url=live_server)["token"]
    st.acknowledge(db, st.authenticate(db, tok).id)
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{live_server}/login?token={tok}")
    page.click("#login")  # the link asks first; the POST logs in
    page.wait_for_url(lambda url: "/login" not in url)
    page.goto(f"{live_server}/label")
    page.click("#next-set")  # showing /label reserves nothing: its button does
    page.wait_for_selector("li.card")
    texts = page.locator("li.card pre.text").all_text_contents()
    assert texts == payloads  # exactly the text, whitespace kept
    assert page.locator("#prompt").text_content() == "<b>not bold</b>\n  second line"
    assert page.evaluate("window.__pwned") is None
    assert page.locator("pre.text *").count() == 0  # no element made from model text
    assert page.locator("img, svg").count() == 0
    assert page.evaluate("document.scripts.length") == 1  # only /static/label.js
    assert page.locator("header .who").text_content() == "<img src=x onerror=alert(1)>"
    # ranking them works like any other set
    page.locator("li.card").first.click()
    for key in ("1", "2", "3", "4", "Enter"):
        page.keyboard.press(key)
    page.wait_for_selector("#all-done")
    assert dialogs == []
    assert st.load_labels(db)[1][0].ranks == {"c0": 1, "c1": 2, "c2": 3, "c3": 4}
    page.close()


def test_thumbs_mode_and_skip_in_the_browser(db, live_server, browser):
    st.create_project(db, mode="thumbs", per_set=1)
    st.import_sets(db, [four("t1", "Thumbs?"), four("t2", "Skip me?")])
    link = st.invite(db, "tom", base_url=live_server)["link"]
    page = browser.new_page()
    page.goto(link)
    page.click("#login")  # the link asks first; the POST logs in
    page.wait_for_url(lambda url: "/login" not in url)
    page.click("#acknowledge")
    page.wait_for_url("**/label")
    # the buttons say what they do in words (no emoji font needed)
    assert page.locator("li.card").first.locator("button").all_inner_texts() == ["Up (Y)", "Down (N)"]
    page.locator("li.card").first.click()
    for key in ("y", "n", "n", "y"):
        page.keyboard.press(key)
    assert page.locator("li.card .badge").all_inner_texts() == ["up", "down", "down", "up"]
    # uppercase K / J move like k / j (the docs say J / K): up one, change it, down again
    page.keyboard.press("K")
    assert page.locator("li.card.selected").get_attribute("data-cid") == "c2"
    page.keyboard.press("J")
    assert page.locator("li.card.selected").get_attribute("data-cid") == "c3"
    page.locator("li.card[data-cid=c3] button.down").click()  # change my mind with the mouse
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_text("Skip me?")
    page.keyboard.press("s")
    page.keyboard.type("I cannot judge this")
    page.click("#skip")
    page.wait_for_selector("#all-done")
    _, rankings, _ = st.load_labels(db)
    assert [(r.set_id, r.thumbs) for r in rankings] == [
        ("t1", {"c0": "up", "c1": "down", "c2": "down", "c3": "down"})
    ]
    assert st.project_progress(db)["labellers"][0]["skipped"] == 1
    page.close()


def test_admin_page_shows_progress_and_invites_by_form(db, live_server, browser):
    st.create_project(db, per_set=2)
    st.import_sets(db, [four("a1", "One?")])
    st.invite(db, "ada")
    adm = st.create_admin(db, base_url=live_server)["link"]
    page = browser.new_page()
    page.goto(adm)
    page.click("#login")  # the link asks first; the POST logs in
    page.wait_for_url(lambda url: "/login" not in url)
    page.wait_for_url("**/admin")
    assert "0 of 2 labels" in page.locator("#overall").inner_text()
    assert "not available" in page.locator("#agreement-unavailable").inner_text()
    page.fill("#invite-form input[name=name]", "bea")
    page.click("#invite-form button")
    link = page.locator("#invite-link").inner_text()
    assert link.startswith(f"{live_server}/login?token=")
    assert st.authenticate(db, link.split("token=")[1]).name == "bea"
    page.close()


def test_held_sets_come_back_after_the_lease_or_a_revoke_and_are_finished_by_another(db, serve_app, browser):
    """ada takes a set and walks away; cy takes the other and is revoked: it is free at once and
    bob finishes it. After ada's lease her set goes to bob too; her late submit from the page she
    left open says it was not stored."""
    from alignloop.feedback.app import create_app

    lease = 10.0  # long enough for the revoke part to happen inside ada's lease under load
    url = serve_app(create_app(db, lease_seconds=lease))
    st.create_project(db, per_set=1)
    st.import_sets(db, [four("s1", "First?"), four("s2", "Second?")])
    links = {n: st.invite(db, n, base_url=url)["link"] for n in ("ada", "bob", "cy")}
    admin_link = st.create_admin(db, base_url=url)["link"]

    def login(link: str, labeller: bool = True):
        page = browser.new_context().new_page()
        page.goto(link)
        page.click("#login")
        page.wait_for_url(lambda u: "/login" not in u)
        if labeller:
            page.click("#acknowledge")  # acknowledging reserves the first set
            page.wait_for_url("**/label")
        return page

    def rank_and_submit(page, keys: str) -> None:
        page.locator("li.card").first.click()
        for key in keys:
            page.keyboard.press(key)
        page.keyboard.press("Enter")

    admin = login(admin_link, labeller=False)
    ada = login(links["ada"])
    ada_took = time.monotonic()
    assert ada.locator("#prompt").inner_text() == "First?"
    cy = login(links["cy"])
    assert cy.locator("#prompt").inner_text() == "Second?"
    admin.goto(f"{url}/admin")
    assert [r.locator("td").nth(1).inner_text() for r in admin.locator("#held tbody tr").all()] == [
        "ada",
        "cy",
    ]
    admin.locator("#labellers tr", has_text="cy").locator("button", has_text="Revoke").click()
    expect(admin.locator("#notice")).to_contain_text("1 held set(s) released")
    assert "1 labeller revoked" in admin.locator("#released").inner_text()
    bob = login(links["bob"])
    assert bob.locator("#prompt").inner_text() == "Second?"  # cy's set, free at once
    assert time.monotonic() - ada_took < lease  # (ada's set was still held: s2 was the only free one)
    rank_and_submit(bob, "1234")
    expect(bob.locator("#all-done")).to_be_visible()  # s1 is held by ada: nothing for bob

    time.sleep(max(0.0, ada_took + lease + 0.5 - time.monotonic()))
    admin.goto(f"{url}/admin")
    expect(admin.locator("#no-held")).to_be_visible()
    assert "1 lease expired" in admin.locator("#released").inner_text()
    bob.goto(f"{url}/label")
    bob.click("#next-set")  # the released slot is his
    expect(bob.locator("#prompt")).to_have_text("First?")
    rank_and_submit(bob, "213f")
    expect(bob.locator("#all-done")).to_be_visible()
    assert st.project_progress(db)["complete"]

    rank_and_submit(ada, "1234")  # ada comes back to the page she left open
    expect(ada.locator("#error")).to_contain_text("not stored")
    assert "lease expired" in ada.locator("#error").inner_text()
    _, rankings, _ = st.load_labels(db)
    assert sorted((r.set_id, r.labeller) for r in rankings) == [("s1", "bob"), ("s2", "bob")]
