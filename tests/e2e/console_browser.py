"""The console's browser tests: Debian's chromium driven by Playwright (pinned in
scripts/test.sh), against a console the Rust test (tests/e2e/console.rs) started. Every check
raises on failure; what was measured is printed as one JSON object on stdout.

Usage: console_browser.py CASE.json, where CASE says the console's address and token, what
the pages must show, and what to do (see console.rs).
"""

import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def nav_ms(page):
    """How long the page that just loaded took, from the request to its load event."""
    return page.evaluate(
        "() => { const n = performance.getEntriesByType('navigation')[0];"
        " return n.loadEventEnd - n.startTime; }"
    )


def main():
    case = json.load(open(sys.argv[1]))
    base = case["base"].rstrip("/")
    shots = case.get("shots")
    timings = {}
    out = {"timings": timings}
    # Downloads and the export's copy go here; it is removed when the script exits, failed or not.
    scratch = tempfile.TemporaryDirectory(prefix="sbk-console-browser-")

    def shot(page, name):
        if shots:
            page.screenshot(path=os.path.join(shots, name + ".png"), full_page=True)

    def visit(page, name, path):
        resp = page.goto(base + path)
        check(resp is not None and resp.status == 200, f"{path}: status {resp and resp.status}")
        timings[name] = nav_ms(page)
        check(page.title().endswith("sbk console"), f"{path}: not a console page: {page.title()}")

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=case["chromium"], args=["--no-sandbox", "--disable-gpu"]
        )
        ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()

        # Without the token: a browser goes to the login form, a script gets 401.
        page.goto(base + "/")
        check("/login" in page.url, f"not sent to the login form: {page.url}")
        r = ctx.request.get(base + "/sources")
        check(r.status == 401, f"a request without the token got {r.status}")
        shot(page, "login")
        page.fill("#token", "not-the-token-at-all")
        page.click("form.login button")
        check(page.locator("p.error").count() == 1, "a wrong token is not refused")
        page.fill("#token", case["token"])
        page.click("form.login button")
        page.wait_for_url(base + "/")
        timings["overview_after_login"] = nav_ms(page)

        # Overview: every repository with its snapshot count.
        visit(page, "overview", "/")
        for i, repo in enumerate(case["repos"]):
            card = page.locator(f"#repo-{i}")
            check(card.locator("h2").inner_text().startswith(repo["location"]),
                  f"repository {i} is not {repo['location']}")
            if repo.get("unavailable"):
                check("failed" in card.get_attribute("class"), f"{repo['location']} does not stand out")
                check("Cannot be opened" in card.inner_text(), f"{repo['location']}: no error shown")
                continue
            count = card.locator(".snapshot-count").inner_text()
            check(count == str(repo["snapshots"]),
                  f"{repo['location']}: {count} snapshots shown, {repo['snapshots']} expected")
            if "last_verify" in repo:
                shown = card.locator(".last-verify .badge").inner_text()
                check(shown == repo["last_verify"],
                      f"{repo['location']}: last verify {shown}, expected {repo['last_verify']}")
        shot(page, "overview")

        # Sources: the failed source stands out with its error.
        visit(page, "sources", "/sources")
        if "failed" in case:
            row = page.locator(f'tr[data-source="{case["failed"]["source"]}"]')
            check(row.count() == 1, "the failed source is not listed")
            check("failed" in (row.get_attribute("class") or ""), "the failed source does not stand out")
            text = row.inner_text()
            check("failure" in text, f"the failed source's status is not shown: {text}")
            check(case["failed"]["error"] in text, f"its error is not shown: {text}")
        shot(page, "sources")

        if "source" in case:
            visit(page, "source", case["source"])
            check(page.locator("table.snapshots tbody tr").count() >= 1, "no snapshot rows")
            shot(page, "source")

        if "snapshot" in case:
            visit(page, "snapshot", case["snapshot"])
            shot(page, "snapshot")

        visit(page, "jobs", "/jobs")
        if "failed" in case:
            check(case["failed"]["error"] in page.inner_text("main"), "the job history lacks the error")
        shot(page, "jobs")

        if "files" in case:
            f = case["files"]
            visit(page, "files", f["dir"])
            shot(page, "files")
            with page.expect_download() as d:
                page.locator(f'tr:has(td a:text-is("{f["name"]}")) a[download]').click()
            dl = d.value
            check(dl.failure() is None, f"the download failed: {dl.failure()}")
            saved = os.path.join(scratch.name, "got")
            dl.save_as(saved)
            check(filecmp.cmp(saved, f["expect"], shallow=False),
                  "the downloaded file differs from the source file")
            out["downloaded_bytes"] = os.path.getsize(saved)

        if "damaged" in case:
            f = case["damaged"]
            page.goto(base + f["dir"])
            with page.expect_download() as d:
                page.locator(f'tr:has(td a:text-is("{f["name"]}")) a[download]').click()
            dl = d.value
            failure = dl.failure()
            check(failure is not None, "a download across a damaged chunk completed")
            out["damaged_download"] = failure

        if "export" in case:
            e = case["export"]
            visit(page, "snapshot_export", e["page"])
            page.click("button.start")
            page.wait_for_selector("section.export")
            uri = page.locator("section.export").first.get_attribute("data-uri")
            check(uri and uri.startswith("nbd+unix:///"), f"no export URI: {uri}")
            shot(page, "export")
            raw = os.path.join(scratch.name, "export.raw")
            subprocess.run(["nbdcopy", uri, raw], check=True)
            check(filecmp.cmp(raw, e["restored"], shallow=False),
                  "the export differs from the snapshot's restore")
            visit(page, "exports", "/exports")
            shot(page, "exports")
            page.click("button.stop")
            page.wait_for_url(base + "/exports")
            gone = subprocess.run(["nbdinfo", "--size", uri], capture_output=True)
            check(gone.returncode != 0, "the export still answers after it was stopped")
            out["export_uri"] = uri

            # A POST without the CSRF token (or with another) is refused, though the session
            # cookie goes with it.
            form = {"repo": str(e["repo"]), "snapshot": e["snapshot"]}
            r = ctx.request.post(base + "/exports", form=form)
            check(r.status == 403, f"a POST without the CSRF token got {r.status}")
            r = ctx.request.post(base + "/exports", form=dict(form, csrf="0" * 64))
            check(r.status == 403, f"a POST with a wrong CSRF token got {r.status}")
            check("data-uri" not in ctx.request.get(base + "/exports").text(),
                  "an export started without the CSRF token")

        for name, path in case.get("timed", {}).items():
            visit(page, name, path)
        budget = case.get("budget_ms")
        if budget:
            slow = {k: v for k, v in timings.items() if v > budget}
            check(not slow, f"pages over {budget} ms: {slow}")
        browser.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
