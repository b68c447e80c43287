"""The documented nginx configuration (docs/deploy/nginx-labelling.conf), run for real on
loopback with a self-signed certificate in front of the app, driven by Chromium over HTTPS.

nginx rewrites Host to its upstream (127.0.0.1:PORT); the app, trusting the proxy's
X-Forwarded-Proto/Host, must still accept the browser's same-origin posts, mark its cookie
Secure (``__Host-``), and write https login links. Needs Debian's nginx and openssl (CI
installs nginx as it installs chromium); skipped locally when they are missing.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from alignloop.feedback import store as st
from alignloop.records import CompletionSet

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.browser, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def proxied(db, tmp_path):
    """The app on 127.0.0.1 (trusting 127.0.0.1) behind nginx with TLS; yields the https URL."""
    import os

    import uvicorn

    from alignloop.feedback.app import create_app

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None or shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("nginx or openssl missing (apt-get install -y nginx openssl)")
        pytest.skip("nginx not installed: apt-get install -y nginx")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    app_port, tls_port, http_port = free_port(), free_port(), free_port()
    block = (ROOT / "docs" / "deploy" / "nginx-labelling.conf").read_text()
    block = (
        block.replace("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;")
        .replace("listen 80;", f"listen 127.0.0.1:{http_port};")
        .replace("/etc/ssl/certs/labels.example.org.pem", str(cert))
        .replace("/etc/ssl/private/labels.example.org.key", str(key))
        .replace("http://127.0.0.1:8000", f"http://127.0.0.1:{app_port}")
    )
    (tmp_path / "site.conf").write_text(block)
    (tmp_path / "nginx.conf").write_text(
        f"""daemon off; master_process off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
"""
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(db, trust_proxy=["127.0.0.1"]), host="127.0.0.1", port=app_port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    proc = subprocess.Popen(
        [nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)], stderr=subprocess.PIPE
    )
    base = f"https://127.0.0.1:{tls_port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"{base}/healthz", verify=False).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(
                f"nginx/app did not come up: {(tmp_path / 'error.log').read_text(errors='replace')}"
            )
        time.sleep(0.1)
    yield {"base": base, "http": f"http://127.0.0.1:{http_port}"}
    proc.terminate()
    proc.wait(timeout=10)
    server.should_exit = True
    thread.join(timeout=10)


def test_labelling_through_the_documented_nginx_tls_proxy(db, proxied, browser):
    base = proxied["base"]
    st.create_project(db, per_set=1)
    st.import_sets(
        db,
        [
            CompletionSet(
                prompt_id="s0",
                prompt="Through TLS?",
                completions=[{"id": f"c{j}", "text": f"t{j}"} for j in range(3)],
            )
        ],
    )
    admin = st.create_admin(db)["token"]
    # the admin invites through the proxy: the link names the public https address
    made = httpx.post(
        f"{base}/api/admin/labellers",
        json={"name": "ada"},
        headers={"Authorization": f"Bearer {admin}"},
        verify=False,
    )
    assert made.status_code == 200 and made.headers["cache-control"] == "no-store"
    link = made.json()["link"]
    assert link.startswith(f"{base}/login?token=")
    # plain HTTP only redirects to HTTPS
    assert httpx.get(f"{proxied['http']}/login", follow_redirects=False).status_code == 301

    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.goto(link)
    page.click("#login")  # a same-origin POST through the proxy (Origin: https://127.0.0.1:PORT)
    page.wait_for_url(f"{base}/instructions")
    [cookie] = context.cookies()
    assert cookie["name"].startswith("__Host-alignloop-") and cookie["secure"] and cookie["httpOnly"]
    page.click("#acknowledge")  # another form post: the Origin check passes behind the Host rewrite
    page.wait_for_selector("li.card")
    page.locator("li.card").first.click()
    for key in ("1", "2", "3", "Enter"):
        page.keyboard.press(key)
    page.wait_for_selector("#all-done")
    assert [r.ranks for r in st.load_labels(db)[1]] == [{"c0": 1, "c1": 2, "c2": 3}]
    # a post from another origin through the same proxy is still refused
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.content()).group(1)
    r = httpx.post(
        f"{base}/logout", data={"csrf_token": csrf}, headers={"Origin": "https://evil.example"},
        cookies={cookie["name"]: cookie["value"]}, verify=False,
    )  # fmt: skip
    assert r.status_code == 403
    context.close()
