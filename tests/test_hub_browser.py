"""The web hub in a real browser (issue 18): headless Chromium driven by Selenium against a real
`sciorch serve` child. The local user (alice) signs in with the one-time link the server
prints; bob and carol with tokens from `sciorch token create`; alice again through the test
identity provider (tests/idp) on a second server. Screenshots of each page are written under
test-output/hub/ (git-ignored) for a reviewer. Without chromium the tests skip, except under
CI=true, where they fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.hub_browser import MISSING, Served, browser_paths, chrome, output_dir, sciorch_serve
from tests.mcp_helpers import sdk_client, structured

pytestmark = pytest.mark.timeout(600)

PAGES = [
    "/",
    "/hub/events",
    "/hub/entries",
    "/hub/entries/ent-000000000000",
    "/hub/launch/http-app",
    "/hub/campaigns",
    "/hub/campaigns/cmp-000000000000",
    "/hub/sites",
]
# A job that writes a PNG (1x1) to its output dir: the entry page shows it inline.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
    "hQGAhKmMIQAAAABJRU5ErkJggg=="
)
PLOT_JOB = f"""\
name: plot-job
version: 1.0.0
kind: job
description: writes plot.png and a result
command:
  - "{{python}}"
  - "-c"
  - >-
    import base64, json, os, pathlib;
    pathlib.Path(os.environ['SCIORCH_OUTPUT_DIR'], 'plot.png').write_bytes(
    base64.b64decode('{PNG}'));
    pathlib.Path(os.environ['SCIORCH_RESULT']).write_text(json.dumps(dict(value=42)))
parameters:
  type: object
  additionalProperties: false
  properties: {{}}
resources:
  cpus: 0.5
  memory: 128Mi
  walltime: "00:10:00"
"""
# Holds one of the local site's two (virtual) GPUs until cancelled.
GPU_JOB = """\
name: gpu-hold
version: 1.0.0
kind: job
description: holds a GPU until cancelled
command: ["{python}", "-c", "import time; time.sleep(600)"]
parameters:
  type: object
  additionalProperties: false
  properties: {}
resources:
  cpus: 0.5
  memory: 128Mi
  gpus: 1
  walltime: "00:10:00"
"""
SITES = """
[[sites]]
name = "local"
kind = "local"
gpus = 2
gpu_type = "virtual"
"""
MCP_PROTOCOL = "2026-07-28"
STREAMS = ["/hub/live/entries", "/hub/live/campaigns/cmp-000000000000"]
POSTS = [
    "/hub/launch/http-app",
    "/hub/events",
    "/hub/events/evt-000000000000/share",
    "/hub/entries/ent-000000000000/cancel",
    "/hub/campaigns",
    "/hub/campaigns/cmp-000000000000/stop",
    "/hub/campaigns/cmp-000000000000/points",
    "/hub/campaigns/cmp-000000000000/reject",
    "/hub/campaigns/cmp-000000000000/annotate",
    "/hub/campaigns/cmp-000000000000/budget",
    "/logout",
]


def _need_browser() -> None:
    if browser_paths() is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {MISSING}")
        pytest.skip(MISSING)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    _need_browser()
    home = tmp_path_factory.mktemp("hub") / "home"
    home.mkdir()
    templates = home.parent / "templates"
    templates.mkdir()
    (templates / "plot-job.yaml").write_text(PLOT_JOB)
    (templates / "gpu-hold.yaml").write_text(GPU_JOB)
    (home / "config.toml").write_text(f'catalogue_dirs = ["{templates}"]\n{SITES}')
    with sciorch_serve(home, "alice") as server:
        try:
            yield server
        finally:
            cancel_everything(server)


def cancel_everything(served: Served) -> None:
    """Services outlive the server that started them (by design): cancel what is left."""
    with httpx2.Client(base_url=served.base, follow_redirects=True, timeout=60) as http:
        http.get(served.login_link(after=served.links_printed() - 1))
        page = http.get("/hub/entries").text
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found is not None, page[:500]
        for entry_id, state in re.findall(r'id="e-(ent-[0-9a-f]+)".*?class="st s-(\w+)"', page):
            if state not in ("succeeded", "failed", "cancelled", "expired"):
                http.post(f"/hub/entries/{entry_id}/cancel", data={"csrf": found.group(1)})


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[WebDriver]:
    driver = chrome()
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(output_dir() / f"{name}.png"))


def wait_for(driver: WebDriver, what: Callable[[WebDriver], Any], timeout: float = 60) -> Any:
    try:
        # A live update may replace an element between finding it and reading it: try again.
        return WebDriverWait(
            driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        ).until(what)
    except TimeoutException:
        shot(driver, "timeout")
        where = f"{driver.current_url}: {driver.page_source[:3000]}"
        raise AssertionError(f"timed out on {where}") from None


def text_of(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def mark_page(driver: WebDriver) -> str:
    """A value only this load of the page holds: still there later means no reload."""
    token = os.urandom(6).hex()
    driver.execute_script("window.__hubMark = arguments[0];", token)
    return token


def same_page(driver: WebDriver, token: str) -> bool:
    return bool(driver.execute_script("return window.__hubMark === arguments[0];", token))


def sign_in_as_alice(driver: WebDriver, served: Served) -> None:
    driver.delete_all_cookies()
    driver.get(served.login_link(after=served.links_printed() - 1))
    wait_for(driver, lambda d: d.find_elements(By.ID, "whoami"))
    assert text_of(driver, "#whoami") == "alice"


def sign_in_with_token(driver: WebDriver, served: Served, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(served.base + "/hub/events")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "token-login").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "whoami"))


# ------------------------------------------------------------------ signing in is required


def test_no_page_answers_without_signing_in_and_no_post_without_the_csrf_token(
    served: Served,
) -> None:
    with httpx2.Client(base_url=served.base, follow_redirects=False, timeout=30) as http:
        for page in PAGES:
            resp = http.get(page)
            assert resp.status_code == 303, (page, resp.status_code)
            assert resp.headers["location"].startswith("/login?next="), page
        for stream in STREAMS:
            assert http.get(stream).status_code == 401, stream
        for post in POSTS:
            assert http.post(post, data={"csrf": "x"}).status_code == 401, post
        # a forged session cookie is no session
        http.cookies.set("sciorch_hub", "eyJzdWIiOiJhbGljZSJ9.bm90LWEtbWFj")
        assert http.get("/").status_code == 303
        http.cookies.clear()
        # a token that is not ours is refused, on a login form whose CSRF token is checked
        login = http.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert csrf is not None
        bad = http.post("/login", data={"csrf": csrf.group(1), "token": "not-a-jwt"})
        assert bad.status_code == 401 and "not accepted" in bad.text
        assert http.post("/login", data={"token": served.token("bob")}).status_code == 403
        # signed in (bob's token), a POST without the session's CSRF token is refused
        good = http.post("/login", data={"csrf": csrf.group(1), "token": served.token("bob")})
        assert good.status_code == 303 and "sciorch_hub" in good.cookies
        assert http.get("/hub/events").status_code == 200
        for post in POSTS:
            resp = http.post(post, data={"name": "x", "principal": "carol"})
            assert resp.status_code == 403 and "CSRF" in resp.text, post
            assert http.post(post, data={"csrf": "wrong"}).status_code == 403, post
        # a read-only token signs in, but may not launch
        again = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text)
        assert again is not None  # the last sign-in used up the login form's token
        dan = served.token("dan", "read")
        ro = http.post("/login", data={"csrf": again.group(1), "token": dan})
        assert ro.status_code == 303
        launch = http.get("/hub/launch/http-app")
        session_csrf = re.search(r'name="csrf" value="([^"]+)"', launch.text)
        assert session_csrf is not None
        refused = http.post("/hub/launch/http-app", data={"csrf": session_csrf.group(1)})
        assert refused.status_code == 403 and "may only read" in refused.text


def test_the_local_user_signs_in_with_the_link_serve_printed_and_only_once(
    served: Served, browser: WebDriver
) -> None:
    browser.get(served.base + "/hub/entries")
    assert "/login" in browser.current_url
    shot(browser, "01-login")
    link = served.login_link()
    browser.get(link)
    wait_for(browser, lambda d: d.find_elements(By.ID, "whoami"))
    assert text_of(browser, "#whoami") == "alice"
    cards = browser.find_elements(By.CSS_SELECTOR, "li.card.service")
    names = {c.get_attribute("id") for c in cards}
    assert {"service-http-app", "service-sim-instrument"} <= names
    assert "GPU" in text_of(browser, "#service-http-app")
    shot(browser, "02-catalogue")
    cookie = browser.get_cookie("sciorch_hub")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    # used: the link signs nobody in again; the server printed the next one
    browser.delete_all_cookies()
    browser.get(link)
    assert "not valid" in browser.page_source
    assert served.links_printed() == 2 and served.login_link() != link
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/hub/sites")
    assert "local" in text_of(browser, "#site-local") and "up" in text_of(browser, "#site-local")
    shot(browser, "03-sites")


# ------------------------------------------------------------------ launching and watching


def test_bad_form_input_shows_the_servers_error_beside_the_field(
    served: Served, browser: WebDriver
) -> None:
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/hub/launch/http-app")
    greeting = browser.find_element(By.ID, "param-greeting")
    assert greeting.get_attribute("maxlength") == "200"  # the browser checks it first
    crash = browser.find_element(By.ID, "param-crash_after_s")
    assert crash.get_attribute("type") == "number"
    # a client that does not validate (or an old browser): the server says what is wrong
    browser.execute_script("document.getElementById('launch-form').noValidate = true;")
    browser.execute_script("arguments[0].removeAttribute('maxlength');", greeting)
    greeting.clear()
    greeting.send_keys("x" * 250)
    crash.send_keys("5")
    browser.find_element(By.ID, "launch-submit").click()
    error = wait_for(browser, lambda d: d.find_elements(By.ID, "param-greeting-error"))[0]
    assert "parameters.greeting" in error.text and "too long" in error.text
    # beside its field, and the field says so to assistive technology
    field = browser.find_element(By.ID, "param-greeting")
    assert field.get_attribute("aria-invalid") == "true"
    assert "param-greeting-error" in (field.get_attribute("aria-describedby") or "")
    assert browser.find_element(By.ID, "param-crash_after_s").get_attribute("value") == "5"
    shot(browser, "04-launch-error")


def test_http_app_launched_from_the_form_becomes_ready_live_serves_and_logs(
    served: Served, browser: WebDriver
) -> None:
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/hub/launch/http-app")
    greeting = browser.find_element(By.ID, "param-greeting")
    greeting.clear()
    greeting.send_keys("hello from the hub")
    browser.find_element(By.ID, "launch-submit").click()
    wait_for(browser, lambda d: "/hub/entries/ent-" in d.current_url)
    mark = mark_page(browser)
    wait_for(browser, lambda d: text_of(d, "#state") == "ready", timeout=120)
    assert same_page(browser, mark), "the state changed by reloading the page"
    opened = browser.find_element(By.ID, "open-url")
    assert opened.is_displayed()
    url = opened.get_attribute("href")
    assert url and "/entries/ent-" in url
    logs = browser.find_element(By.ID, "logs")
    wait_for(browser, lambda d: "[http-app] serving on" in logs.text)
    shot(browser, "05-entry-ready")
    entry_page = browser.current_window_handle
    opened.click()
    wait_for(browser, lambda d: len(d.window_handles) == 2)
    browser.switch_to.window(next(h for h in browser.window_handles if h != entry_page))
    wait_for(browser, lambda d: "hello from the hub" in d.page_source)
    shot(browser, "06-service")
    browser.close()
    browser.switch_to.window(entry_page)
    # the request just made reaches the logs on the page that is still open
    wait_for(browser, lambda d: '"GET / HTTP/1.1" 200' in text_of(d, "#logs"))
    assert same_page(browser, mark)
    transitions = text_of(browser, "#transitions")
    for state in ("pending", "running", "ready"):
        assert state in transitions
    browser.get(served.base + "/hub/entries")
    row = browser.find_element(By.CSS_SELECTOR, "#entries tbody tr")
    assert "http-app" in row.text and "ready" in row.text
    shot(browser, "07-entries")


def test_an_event_shared_with_bob_shows_to_bob_and_not_to_carol(
    served: Served, browser: WebDriver
) -> None:
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/hub/entries")
    entry_link = browser.find_element(By.CSS_SELECTOR, "#entries tbody tr a")
    entry_url = entry_link.get_attribute("href")
    assert entry_url
    browser.get(served.base + "/hub/events")
    row = browser.find_element(By.CSS_SELECTOR, "#events tbody tr")
    event_id = (row.get_attribute("id") or "").removeprefix("event-")
    row.find_element(By.CSS_SELECTOR, "input[name=principal]").send_keys("bob")
    row.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(browser, lambda d: "bob (viewer)" in text_of(d, f"#event-{event_id}"))
    shot(browser, "08-events-shared")

    sign_in_with_token(browser, served, served.token("bob"))
    assert text_of(browser, "#whoami") == "bob"
    assert browser.find_elements(By.ID, f"event-{event_id}")
    browser.get(entry_url)
    assert text_of(browser, "#state") == "ready"
    assert "alice" in text_of(browser, "#entry")
    shot(browser, "09-bob-sees-shared-entry")

    sign_in_with_token(browser, served, served.token("carol"))
    assert text_of(browser, "#whoami") == "carol"
    assert not browser.find_elements(By.ID, f"event-{event_id}")
    browser.get(entry_url)
    assert not browser.find_elements(By.ID, "state")
    assert "not_found" in browser.page_source
    browser.get(served.base + "/hub/entries")
    assert not browser.find_elements(By.CSS_SELECTOR, "#entries tbody tr a")
    shot(browser, "10-carol-sees-nothing")
    entry_id = entry_url.rsplit("/", 1)[-1]
    # nor may carol (nothing shared) or bob (a viewer) act on it, whatever they post
    for who, status in (("carol", 404), ("bob", 403)):
        sign_in_with_token(browser, served, served.token(who))
        cookie = browser.get_cookie("sciorch_hub")
        assert cookie is not None
        with httpx2.Client(base_url=served.base, cookies={"sciorch_hub": cookie["value"]}) as http:
            found = re.search(r'name="csrf" value="([^"]+)"', http.get("/hub/events").text)
            assert found is not None
            csrf = found.group(1)
            cancel = http.post(f"/hub/entries/{entry_id}/cancel", data={"csrf": csrf})
            assert cancel.status_code == status, (who, cancel.status_code)
            share = http.post(
                f"/hub/events/{event_id}/share",
                data={"csrf": csrf, "principal": who, "role": "operator"},
            )
            assert share.status_code in (400, 403, 404) and "not_" in share.text, who
            stop = http.post(f"/hub/events/{event_id}/stop", data={"csrf": csrf})
            assert stop.status_code in (400, 403, 404), who
            if who == "carol":
                files = http.get(f"/hub/entries/{entry_id}/files/x.txt")
                assert files.status_code == 404
                with http.stream("GET", f"/hub/live/entries?entry={entry_id}") as live:
                    first = b""
                    for chunk in live.iter_bytes():
                        first += chunk
                        if b"refused" in first or len(first) > 4096:
                            break
                    assert b"event: refused" in first and b"ready" not in first
    sign_in_as_alice(browser, served)
    browser.get(entry_url)
    assert text_of(browser, "#state") == "ready"  # nobody else's post touched it
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda d: text_of(d, "#state") == "cancelled", timeout=60)


def test_a_job_shows_its_result_and_its_image_when_it_ends_without_reloading(
    served: Served, browser: WebDriver
) -> None:
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/")
    browser.find_element(By.ID, "launch-plot-job").click()
    browser.find_element(By.ID, "launch-submit").click()
    wait_for(browser, lambda d: "/hub/entries/ent-" in d.current_url)
    mark = mark_page(browser)
    wait_for(browser, lambda d: text_of(d, "#state") == "succeeded", timeout=120)
    image = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#artifacts img"))[0]
    wait_for(browser, lambda d: d.execute_script("return arguments[0].naturalWidth;", image) == 1)
    assert '"value": 42' in text_of(browser, "#result")
    assert same_page(browser, mark)
    assert not browser.find_element(By.ID, "cancel-form").is_displayed()
    shot(browser, "07b-job-artifacts")


# ------------------------------------------------------------------ campaigns


def start_campaign_as_alice(browser: WebDriver, served: Served, evaluations: int) -> str:
    """Start the campaign page's example campaign with this budget; returns its id (the
    browser is left on its page)."""
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/hub/campaigns")
    spec = browser.find_element(By.ID, "spec")
    text = spec.get_attribute("value") or ""
    assert "evaluations = 10" in text
    spec.clear()
    spec.send_keys(text.replace("evaluations = 10", f"evaluations = {evaluations}"))
    browser.find_element(By.ID, "start-campaign").click()
    wait_for(browser, lambda d: "/hub/campaigns/cmp-" in d.current_url)
    return str(browser.current_url.rsplit("/", 1)[-1])


def test_a_campaign_started_in_the_hub_gains_points_on_its_chart_without_reloading(
    served: Served, browser: WebDriver
) -> None:
    campaign_id = start_campaign_as_alice(browser, served, evaluations=6)
    mark = mark_page(browser)

    def points(what: str = "points") -> int:
        found = browser.execute_script(f"return document.getElementById('chart').dataset.{what};")
        return int(found or 0)

    first = points()
    wait_for(browser, lambda d: points() >= max(first + 1, 2), timeout=240)
    seen = points()
    assert browser.find_elements(By.CSS_SELECTOR, "#chart canvas")  # uPlot drew it
    wait_for(browser, lambda d: points() > seen or points() >= 6, timeout=240)
    # the GP's summaries reach the chart too: its predicted best, mean and spread
    wait_for(browser, lambda d: points("posterior") >= 1, timeout=240)
    assert same_page(browser, mark), "the chart grew by reloading the page"
    rows = browser.find_elements(By.CSS_SELECTOR, "#points tbody tr")
    assert len(rows) >= points()
    shot(browser, "11-campaign-live")
    browser.find_element(By.ID, "c-stop").click()
    wait_for(browser, lambda d: text_of(d, "#c-state").split()[0] in ("stopped", "finished"))
    (view,) = mcp_calls(served, "alice", ("get_campaign", {"campaign_id": campaign_id}))
    trace = view["posterior"]["trace"]
    assert trace and [t["n"] for t in trace] == sorted({t["n"] for t in trace}), trace
    assert all(t["std"] >= 0 and t["n"] <= view["progress"]["succeeded"] for t in trace), trace
    browser.get(served.base + "/hub/campaigns")
    shot(browser, "12-campaigns")


def mcp_calls(served: Served, who: str, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """Tool calls over MCP (the SDK client, streamable HTTP) as `who`: what each returned."""

    async def run() -> list[Any]:
        url = served.base + "/mcp"
        async with sdk_client(url, served.token(who), mode=MCP_PROTOCOL) as client:
            return [structured(await client.call_tool(name, args)) for name, args in calls]

    return asyncio.run(run())


def local_gpus(served: Served) -> tuple[int | None, int | None]:
    (listing,) = mcp_calls(served, "alice", ("list_sites", {}))
    caps = next(s for s in listing["sites"] if s["name"] == "local")["capabilities"]
    return caps["gpus_free"], caps["gpus_total"]


@contextlib.contextmanager
def session_of(driver: WebDriver, served: Served) -> Iterator[tuple[httpx2.Client, str]]:
    """An HTTP client on the browser's session, and the session's CSRF token."""
    cookie = driver.get_cookie("sciorch_hub")
    assert cookie is not None
    with httpx2.Client(base_url=served.base, cookies={"sciorch_hub": cookie["value"]}) as http:
        found = re.search(r'name="csrf" value="([^"]+)"', http.get("/hub/events").text)
        assert found is not None
        yield http, found.group(1)


# ------------------------------------------------------------------ sites


def test_free_gpus_drop_while_an_entry_holds_one_over_mcp_and_on_the_sites_page(
    served: Served, browser: WebDriver
) -> None:
    sign_in_as_alice(browser, served)
    assert local_gpus(served) == (2, 2)
    browser.get(served.base + "/hub/sites")
    assert text_of(browser, "#site-local td.gpus") == "2 of 2 (virtual)"
    browser.get(served.base + "/hub/launch/gpu-hold")
    browser.find_element(By.ID, "launch-submit").click()
    wait_for(browser, lambda d: "/hub/entries/ent-" in d.current_url)
    entry_page = browser.current_url
    wait_for(browser, lambda d: text_of(d, "#state") == "running", timeout=120)
    assert local_gpus(served) == (1, 2)
    browser.get(served.base + "/hub/sites")
    assert text_of(browser, "#site-local td.gpus") == "1 of 2 (virtual)"
    shot(browser, "17-sites-gpu-held")
    browser.get(entry_page)
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda d: text_of(d, "#state") == "cancelled", timeout=60)
    assert local_gpus(served) == (2, 2)  # given back


# ------------------------------------------------------------------ the entries list, live


def test_entries_join_the_list_live_only_for_those_who_may_see_them(
    served: Served, browser: WebDriver
) -> None:
    sign_in_as_alice(browser, served)
    browser.get(served.base + "/hub/entries")
    wait_for(browser, lambda d: text_of(d, "#live") == "live")
    alice_mark = mark_page(browser)
    bob = chrome()
    try:
        sign_in_with_token(bob, served, served.token("bob"))
        bob.get(served.base + "/hub/entries")
        wait_for(bob, lambda d: text_of(d, "#live") == "live")
        bob_mark = mark_page(bob)
        own, shared = mcp_calls(
            served,
            "alice",
            ("create_event", {"name": "alice alone"}),
            ("create_event", {"name": "alice with bob"}),
        )
        mcp_calls(
            served,
            "alice",
            ("share_event", {"event_id": shared["id"], "principal": "bob", "role": "viewer"}),
        )
        # first in alice's own event, then in the shared one: bob's stream hears them in
        # this order, so once the second shows, the first has been passed over
        hidden, seen = mcp_calls(
            served,
            "alice",
            ("submit_job", {"service": "plot-job", "event_id": own["id"]}),
            ("submit_job", {"service": "plot-job", "event_id": shared["id"]}),
        )
        row = f"#e-{seen['id']}"
        wait_for(bob, lambda d: d.find_elements(By.CSS_SELECTOR, row))
        assert "plot-job" in text_of(bob, row) and "alice" in text_of(bob, row)
        wait_for(bob, lambda d: text_of(d, f"{row} .st") == "succeeded", timeout=120)
        mcp_calls(served, "alice", ("wait_entry", {"entry_id": hidden["id"]}))
        assert not bob.find_elements(By.ID, f"e-{hidden['id']}")
        assert same_page(bob, bob_mark), "bob's list grew by reloading"
        shot(bob, "18-bob-entries-live")
        # alice's own list gained both, live
        for entry in (hidden, seen):
            wait_for(browser, lambda d, e=entry: text_of(d, f"#e-{e['id']} .st") == "succeeded")
        assert same_page(browser, alice_mark)
        link = browser.find_element(By.CSS_SELECTOR, f"#e-{seen['id']} a")
        assert link.get_attribute("href") == f"{served.base}/hub/entries/{seen['id']}"
    finally:
        bob.quit()


# ------------------------------------------------------------------ steering a campaign


def test_a_campaign_is_steered_from_its_page_and_a_viewer_may_not(
    served: Served, browser: WebDriver
) -> None:
    campaign_id = start_campaign_as_alice(browser, served, evaluations=40)
    mark = mark_page(browser)
    browser.find_element(By.ID, "c-pause").click()
    wait_for(browser, lambda d: "(paused)" in text_of(d, "#c-state"))

    # a point outside the space: the server's error beside its field
    browser.execute_script("document.getElementById('add-point-form').noValidate = true;")
    x1 = browser.find_element(By.ID, "param-x1")
    x1.clear()
    x1.send_keys("99")
    browser.find_element(By.ID, "param-x2").send_keys("2.5")
    browser.find_element(By.ID, "add-point-submit").click()
    error = wait_for(browser, lambda d: d.find_elements(By.ID, "param-x1-error"))[0]
    assert "points.0.x1" in error.text and "outside" in error.text
    assert browser.find_element(By.ID, "param-x1").get_attribute("aria-invalid") == "true"
    shot(browser, "19-campaign-point-error")

    x1 = browser.find_element(By.ID, "param-x1")
    x1.clear()
    x1.send_keys("1.5")
    x2 = browser.find_element(By.ID, "param-x2")
    x2.clear()
    x2.send_keys("2.5")
    browser.find_element(By.ID, "add-point-submit").click()

    def points_table(d: WebDriver) -> list[dict[str, str]]:
        # read in one script: the table is rebuilt on each change the stream brings
        return list(
            d.execute_script(
                "return Array.from(document.querySelectorAll('#points tbody tr')).map("
                "r => ({id: r.id, text: r.innerText, state: r.dataset.state}));"
            )
        )

    def added(d: WebDriver) -> list[dict[str, str]]:
        return [
            r for r in points_table(d) if "x1=1.500, x2=2.500" in r["text"] and "added" in r["text"]
        ]

    row = wait_for(browser, added)[0]
    point_id = row["id"].removeprefix("pt-")
    assert row["state"] == "queued"
    assert not browser.find_elements(By.ID, "param-x1-error")  # the fresh form
    # reject it (the paused campaign has not measured it)
    wait_for(browser, lambda d: point_id in text_of(d, "#reject-point"))
    Select(browser.find_element(By.ID, "reject-point")).select_by_value(point_id)
    browser.find_element(By.ID, "reject-note").send_keys("too close to the edge")
    browser.find_element(By.ID, "reject-submit").click()
    wait_for(browser, lambda d: added(d)[0]["state"] == "rejected")
    browser.find_element(By.ID, "annotate-text").send_keys("looks promising near x1=1.5")
    browser.find_element(By.ID, "annotate-submit").click()
    wait_for(browser, lambda d: "alice annotate" in text_of(d, "#actions"))
    assert "looks promising near x1=1.5" in text_of(browser, "#actions")
    assert "alice reject" in text_of(browser, "#actions")
    # a wall time that is no duration: the error beside that field
    browser.find_element(By.ID, "budget-wall-time").send_keys("soon")
    browser.find_element(By.ID, "budget-submit").click()
    error = wait_for(browser, lambda d: d.find_elements(By.ID, "budget-wall-error"))[0]
    assert "wall_time_s" in error.text and "soon" in error.text, error.text
    assert not browser.find_elements(By.ID, "budget-error")
    budget = browser.find_element(By.ID, "budget-evaluations")
    budget.clear()
    budget.send_keys("12")
    wall = browser.find_element(By.ID, "budget-wall-time")
    wall.clear()
    wall.send_keys("2h")
    browser.find_element(By.ID, "budget-submit").click()
    wait_for(browser, lambda d: text_of(d, "#c-progress").endswith("/ 12"))
    assert same_page(browser, mark), "the campaign page was reloaded"
    shot(browser, "20-campaign-steered")

    # bob, a viewer of the campaign's event, sees it and its notes, not the forms; carol
    # (nothing shared) sees nothing; neither may steer, whatever they post
    (view,) = mcp_calls(served, "alice", ("get_campaign", {"campaign_id": campaign_id}))
    assert view["event_id"], view
    mcp_calls(
        served,
        "alice",
        ("share_event", {"event_id": view["event_id"], "principal": "bob", "role": "viewer"}),
    )
    posts = {
        "points": {"p.x1": "1", "p.x2": "1"},
        "reject": {"point_id": point_id},
        "annotate": {"text": "mine now"},
        "budget": {"evaluations": "99"},
        "stop": {},
    }
    for who, status in (("bob", 403), ("carol", 404)):
        sign_in_with_token(browser, served, served.token(who))
        browser.get(f"{served.base}/hub/campaigns/{campaign_id}")
        if who == "bob":
            assert "alice annotate" in text_of(browser, "#actions")
            assert not browser.find_elements(By.ID, "steer")
            assert not browser.find_elements(By.ID, "c-stop")
            shot(browser, "21-campaign-viewer")
        else:
            assert not browser.find_elements(By.ID, "campaign")
        with session_of(browser, served) as (http, csrf):
            for action, data in posts.items():
                resp = http.post(
                    f"/hub/campaigns/{campaign_id}/{action}", data={"csrf": csrf, **data}
                )
                assert resp.status_code == status, (who, action, resp.status_code)
    (after,) = mcp_calls(served, "alice", ("get_campaign", {"campaign_id": campaign_id}))
    assert after["progress"]["budget"] == 12 and after["state"] == "running"
    assert after["progress"]["wall_time_s"] == 7200
    assert not [a for a in after["actions"] if a["principal"] != "alice"]
    sign_in_as_alice(browser, served)
    browser.get(f"{served.base}/hub/campaigns/{campaign_id}")
    browser.find_element(By.ID, "c-stop").click()
    wait_for(browser, lambda d: text_of(d, "#c-state").split()[0] in ("stopped", "finished"))


def test_the_pages_fit_a_phone_screen(served: Served, browser: WebDriver) -> None:
    sign_in_as_alice(browser, served)
    browser.set_window_size(390, 844)
    try:
        for page, name in (("/", "13-phone-catalogue"), ("/hub/entries", "14-phone-entries")):
            browser.get(served.base + page)
            wide = browser.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth;"
            )
            assert wide <= 1, (page, wide)
            shot(browser, name)
        # keyboard: the first Tab reaches the skip link, which is visible when focused
        browser.get(served.base + "/")
        browser.find_element(By.TAG_NAME, "body").send_keys("\ue004")
        focused = browser.switch_to.active_element
        assert focused.get_attribute("class") == "skip" and focused.is_displayed()
    finally:
        browser.set_window_size(1280, 900)


# ------------------------------------------------------------------ the identity provider


def test_alice_signs_in_through_the_identity_provider(tmp_path: Path) -> None:
    _need_browser()
    from tests.idp import CLIENT_ID, USERS
    from tests.oauth_helpers import idp_issuer

    issuer = idp_issuer()
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[auth]\nissuers = ["{issuer}"]\nhub_client_id = "{CLIENT_ID}"\n'
    )
    with sciorch_serve(home, "nobody") as served:
        assert served.links_printed() == 0  # no one-time link beside an IdP
        driver = chrome()
        try:
            driver.get(served.base + "/hub/sites")
            assert "/login" in driver.current_url
            driver.find_element(By.ID, "oidc-login").click()
            wait_for(driver, lambda d: d.find_elements(By.NAME, "username"))
            driver.find_element(By.NAME, "username").send_keys("alice")
            driver.find_element(By.NAME, "password").send_keys(USERS["alice"])
            driver.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
            wait_for(driver, lambda d: d.find_elements(By.NAME, "allow"))
            shot(driver, "15-idp-consent")
            driver.find_element(By.NAME, "allow").click()
            wait_for(driver, lambda d: d.find_elements(By.ID, "whoami"))
            assert text_of(driver, "#whoami") == "alice"
            assert driver.current_url == served.base + "/hub/sites"
            shot(driver, "16-idp-signed-in")
        finally:
            driver.quit()
