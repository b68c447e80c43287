"""Browser sessions (the real app and database, over FastAPI's TestClient): the login link is
exchanged by a same-origin POST for a server-side session that expires, rotates, and ends on
logout and on revocation; the cookie is Secure over HTTPS (directly or through a trusted
proxy) and named per deployment; the Origin check works behind a proxy that rewrites Host.
(The same in Chromium: tests/feedback/test_browser.py.)"""

from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient

from alignloop.feedback import store as st
from alignloop.feedback.app import create_app


def session_cookies(r) -> list[str]:
    return [c for c in r.headers.get_list("set-cookie") if not c.split("=")[0].endswith("-login")]


def fresh(db: str, base_url: str = "http://testserver", **settings) -> TestClient:
    return TestClient(create_app(db, **settings), base_url=base_url)


def test_logout_ends_the_session_on_the_server(client, people, app_login):
    csrf = app_login(client, people["ada"])
    stolen = dict(client.cookies)  # what someone who copied the cookie would hold
    assert client.get("/api/me").json()["name"] == "ada"
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 200
    with fresh(people["db"]) as other:
        other.cookies.update(stolen)
        assert other.get("/api/me").status_code == 401
    assert client.get("/api/me").status_code == 401


def test_revoking_a_labeller_ends_their_open_session_at_once(client, people, app_login):
    app_login(client, people["ada"])
    assert client.get("/api/me").status_code == 200
    st.revoke(people["db"], "ada")
    assert client.get("/api/me").status_code == 401
    assert client.get("/instructions").status_code == 401
    # a new link restores the login, not the old session
    new = st.invite(people["db"], "ada", new_link=True)["token"]
    assert client.get("/api/me").status_code == 401
    app_login(client, new)
    assert client.get("/api/me").json()["name"] == "ada"


def test_a_session_expires_when_unused(people, app_login):
    with fresh(people["db"], session_hours=3 / 3600) as client:  # 3 seconds
        app_login(client, people["ada"])
        cookie = session_cookies(client.get("/login", params={"token": people["ada"]}))  # none: GET only asks
        assert cookie == []
        assert client.get("/api/me").status_code == 200
        time.sleep(3.2)
        assert client.get("/api/me").status_code == 401


def test_a_session_rotates_and_keeps_its_csrf_token(people, app_login, monkeypatch):
    monkeypatch.setattr(st, "SESSION_ROTATE_SECONDS", 0)  # rotate on every use
    with fresh(people["db"]) as client:
        csrf = app_login(client, people["ada"])  # (the login's follow-up page rotated it once)
        first = dict(client.cookies)
        r = client.get("/api/me")
        assert r.status_code == 200
        [new] = session_cookies(r)
        name, value = new.split(";")[0].split("=", 1)
        assert first[name] != value and "HttpOnly" in new
        # the replaced secret still answers for a short grace (requests in flight), then not
        with fresh(people["db"]) as old:
            old.cookies.update(first)
            assert old.get("/api/me").status_code == 200
        # the page's CSRF token survives rotation: an open page can still post
        ok = client.post("/instructions", data={"csrf_token": csrf}, follow_redirects=False)
        assert ok.status_code == 303
        # logout ends every secret of the session, the replaced ones included
        assert client.post("/logout", data={"csrf_token": csrf}).status_code == 200
        with fresh(people["db"]) as old:
            old.cookies.update(first)
            assert old.get("/api/me").status_code == 401


def test_login_only_by_a_same_origin_post_with_the_pages_nonce(client, people, dump):
    page = client.get("/login", params={"token": people["ada"]})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
    form = {"token": people["ada"], "nonce": nonce}
    before = dump(people["db"])
    # another site's form (the browser sends its Origin), or no Origin/Referer at all
    assert client.post("/login", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/login", data=form).status_code == 403
    # the right origin but not the nonce this browser was given (an attacker's own page's)
    bad = {"token": people["ada"], "nonce": "x" * 32}
    assert client.post("/login", data=bad, headers={"Origin": "http://testserver"}).status_code == 403
    assert dump(people["db"]) == before and client.get("/api/me").status_code == 401
    r = client.post("/login", data=form, headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and client.get("/api/me").json()["name"] == "ada"


def test_cookie_is_secure_over_https_and_named_per_deployment(people, app_login, make_sets, tmp_path):
    # behind a TLS proxy the admin trusts: X-Forwarded-Proto says https
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "labels.example.org"}
    with fresh(people["db"], trust_proxy=["testclient"]) as client:
        client.headers.update(proxy)
        page = client.get("/login", params={"token": people["ada"]})
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
        [nonce_cookie] = page.headers.get_list("set-cookie")
        assert (
            nonce_cookie.startswith("__Host-")
            and "Secure" in nonce_cookie
            and "SameSite=Strict" in nonce_cookie
        )
        # (the test client speaks plain HTTP to the app, as the proxy does, so it would not send a
        # Secure cookie back by itself: send it as the browser would over HTTPS)
        r = client.post(
            "/login",
            data={"token": people["ada"], "nonce": nonce},
            headers={"Origin": "https://labels.example.org", "Cookie": nonce_cookie.split(";")[0]},
            follow_redirects=False,
        )
        [cookie] = session_cookies(r)
        assert cookie.startswith("__Host-alignloop-") and "Secure" in cookie and "Path=/" in cookie
        assert "Domain" not in cookie
        # invite links name the public address, not the proxy's upstream
        made = client.post(
            "/api/admin/labellers",
            json={"name": "dan"},
            headers={"Authorization": f"Bearer {people['admin']}"},
        )
        assert made.json()["link"].startswith("https://labels.example.org/login?token=")
        assert made.headers["cache-control"] == "no-store"
    # the same headers from a client that is not the trusted proxy change nothing
    with fresh(people["db"]) as client:
        client.headers.update(proxy)
        page = client.get("/login", params={"token": people["ada"]})
        assert all("Secure" not in c for c in page.headers.get_list("set-cookie"))
    # two deployments on one host (cookies ignore ports) use different cookie names
    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    st.create_project(other_db, per_set=1)
    bea = st.invite(other_db, "bea")["token"]
    with fresh(people["db"]) as one, fresh(other_db) as two, fresh(people["db"], name="team-b") as three:
        app_login(one, people["ada"])
        app_login(two, bea)
        app_login(three, people["bob"])
        names = [set(c.cookies.keys()) for c in (one, two, three)]
        assert len({frozenset(n) for n in names}) == 3 and "alignloop-team-b" in names[2]
    st.close_store(other_db)


def test_origin_check_behind_a_proxy_that_rewrites_host(people, app_login):
    """nginx's default proxy_pass sends Host: 127.0.0.1:8000; the browser's Origin is the public
    https address. Trusted forwarded headers reconcile the two; untrusted ones do not."""
    public = "https://labels.example.org"
    forwarded = {
        "Host": "127.0.0.1:8000",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "labels.example.org",
    }
    # (the client speaks HTTPS so that it sends the Secure cookies back, as a browser would)
    with fresh(people["db"], base_url=public, trust_proxy=["testclient"]) as client:
        client.headers.update(forwarded)
        csrf = app_login(client, people["ada"], origin=public)
        r = client.post(
            "/instructions", data={"csrf_token": csrf}, headers={"Origin": public}, follow_redirects=False
        )
        assert r.status_code == 303
        evil = client.post("/logout", data={"csrf_token": csrf}, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403
    with fresh(people["db"]) as client:  # not trusted: the public Origin does not match Host
        client.headers.update(forwarded)
        page = client.get("/login", params={"token": people["bob"]})
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
        r = client.post("/login", data={"token": people["bob"], "nonce": nonce}, headers={"Origin": public})
        assert r.status_code == 403


def test_invite_answers_are_not_cached(client, people, app_login):
    csrf = app_login(client, people["admin"])
    r = client.post("/admin/invite", data={"csrf_token": csrf, "name": "eve"})
    assert r.status_code == 200 and "login?token=" in r.text
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_bad_session_lifetime_is_one_clear_error(people, bad):
    from alignloop.errors import UserError

    with pytest.raises(UserError, match="session lifetime must be more than 0"):
        create_app(people["db"], session_hours=bad)


def test_cookie_is_secure_when_the_app_itself_serves_https(people, app_login):
    """uvicorn serving TLS itself (no proxy): the request's own scheme is https."""
    with fresh(people["db"], base_url="https://testserver") as client:
        app_login(client, people["ada"], origin="https://testserver")
        [cookie] = [c for c in client.cookies.jar if not c.name.endswith("-login")]
        assert cookie.name.startswith("__Host-alignloop-") and cookie.secure
        assert client.get("/api/me").json()["name"] == "ada"
