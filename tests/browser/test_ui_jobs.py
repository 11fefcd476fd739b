"""The /ui page's "Batch jobs" section in a real browser, against real servers' ``/jobs``.

Three ``blipserve serve --model demo`` processes: one hosting jobs behind an API key, one
hosting jobs that starts with none (the page's how-to, run as a user would run it), and
one without ``--jobs-dir`` (jobs are off).  Jobs are started over HTTP as a client would;
the page must follow them to their end, and cancel one with its own button.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Locator, Page, Request, expect

from browser.ui_support import API_KEY, PageProblems, Server, open_ui, unlabelled_controls
from testkit.live_server import Launched, launch, serve_command, stop_all, wait_ready

ROOT = Path(__file__).resolve().parents[2]
SCENES = sorted((ROOT / "examples").glob("scene-0*.png"))
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BIG_COPIES = 400  # of the 8 scenes: a job that runs long enough to be canceled midway
# placeholders in the page's curl example (jobs.js)
EXAMPLE_INPUT, EXAMPLE_OUTPUT = "/path/to/images", "/path/to/captions"


@dataclass
class JobsServer:
    server: Server
    root: Path  # its --jobs-allow-root: jobs read and write under it

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def jobs_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], JobsServer]]:
    """name -> a running server: ``jobs`` (needs API_KEY), ``fresh`` (no job yet, no
    key), ``off`` (no --jobs-dir).  The first use starts all three at once."""
    base = tmp_path_factory.mktemp("jobs-servers")
    starting: dict[str, Launched] = {}
    running: dict[str, JobsServer] = {}

    def args(name: str) -> list[str]:
        if name == "off":
            return ["--model", "demo"]
        jobs = ["--jobs-dir", str(base / name / "jobs"), "--jobs-allow-root", str(root(name))]
        key = ["--api-key", API_KEY] if name == "jobs" else []
        return ["--model", "demo", "--max-running-jobs", "1", *jobs, *key]

    def root(name: str) -> Path:
        return base / name / "data"

    def get(name: str) -> JobsServer:
        if not starting:
            for each in ("jobs", "fresh", "off"):
                root(each).mkdir(parents=True)
                command = [sys.executable, "-m", "blipserve.cli"]
                starting[each] = launch(serve_command(command, *args(each)), base / each)
        if name not in running:
            running[name] = JobsServer(wait_ready(starting[name]), root(name))
        return running[name]

    yield get
    stop_all(list(starting.values()))


# -- helpers ---------------------------------------------------------------------------------


def images(folder: Path, copies: int = 1) -> Path:
    """``folder`` holding the 8 example scenes, ``copies`` times over (hard links)."""
    folder.mkdir(parents=True)
    for n in range(copies):
        for scene in SCENES:
            target = folder / f"{n:04d}-{scene.name}"
            try:
                os.link(scene, target)
            except OSError:
                shutil.copyfile(scene, target)
    return folder


def start_job(where: JobsServer, source: Path, output: Path) -> dict[str, Any]:
    """POST /jobs, as a client starts one: the job (202)."""
    body = {
        "properties": {
            "InputData": {"images": {"JobInputType": "UriFolder", "Uri": str(source)}},
            "OutputData": {"captions": {"JobOutputType": "UriFolder", "Uri": str(output)}},
        }
    }
    answer = httpx.post(f"{where.url}/jobs", json=body, headers=AUTH, timeout=30)
    assert answer.status_code == 202, answer.text
    job: dict[str, Any] = answer.json()
    return job


def job_now(where: JobsServer, name: str) -> dict[str, Any]:
    answer = httpx.get(f"{where.url}/jobs/{name}", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    props: dict[str, Any] = answer.json()["properties"]
    return props


def short(name: str) -> str:
    return name.removeprefix("batchjob-")[:8]


def give_key(page: Page) -> None:
    page.fill("#api-key", API_KEY)
    page.locator("#api-key").blur()  # ("change": the jobs are asked for again at once)


def row_of(page: Page, name: str) -> Locator:
    return page.locator(f'#jobs-rows tr.job[data-job="{name}"]')


def jobs_requests(page: Page) -> list[Request]:
    """The GET /jobs requests the page makes from now on."""
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if "/jobs?" in r.url else None)
    return seen


def shot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


# -- the tests -------------------------------------------------------------------------------


def test_jobs_off_shows_the_servers_message(
    jobs_servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    where = jobs_servers("off")
    direct = httpx.get(f"{where.url}/jobs", timeout=30)
    assert direct.status_code == 404
    message = direct.json()["message"]
    assert "--jobs-dir" in message

    page = open_ui(context, where)
    expect(page.locator("#jobs-message")).to_have_text(
        f"Batch jobs are off on this server: {message}"
    )
    expect(page.locator("#jobs-table-wrap")).to_be_hidden()
    expect(page.locator("#jobs-empty")).to_be_hidden()
    expect(page.locator("#jobs-error")).to_be_empty()
    shot(page, screenshots, "jobs-01-off")


def test_no_job_yet_shows_a_curl_example_that_starts_one(
    jobs_servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    where = jobs_servers("fresh")
    page = open_ui(context, where)
    expect(page.locator("#jobs-message")).to_have_text("No batch jobs yet.")
    curl = page.locator("#jobs-curl")
    expect(curl).to_contain_text(f"curl -sS {where.url}/jobs")
    expect(page.locator("#jobs-table-wrap")).to_be_hidden()
    shot(page, screenshots, "jobs-02-none-yet")

    # The example is the contract: with real folders in, it starts a job as it is.
    example = curl.inner_text()
    assert "Authorization" not in example  # (this server has no key, none was typed)
    source = images(where.root / "in")
    output = where.root / "out"
    script = example.replace(EXAMPLE_INPUT, str(source)).replace(EXAMPLE_OUTPUT, str(output))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # loopback only
    ran = subprocess.run(
        ["bash", "-s"],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    name = json.loads(ran.stdout)["name"]

    row = row_of(page, name)
    expect(row.locator(".status-label")).to_have_text("Completed")
    expect(row.locator(".rows-done")).to_have_text(re.compile(r"^8 (of 8 )?done$"))
    expect(page.locator("#jobs-empty")).to_be_hidden()
    expect(page.locator("#jobs-message")).to_have_text("1 batch job: 1 completed.")
    assert (output / "predictions.csv").is_file()


def test_a_job_is_followed_to_completed(
    jobs_servers: Any,
    context: BrowserContext,
    problems: PageProblems,
    screenshots: Path,
) -> None:
    where = jobs_servers("jobs")
    page = open_ui(context, where)
    asked = jobs_requests(page)
    # The key first: without it the server refuses the list, and the page says why.
    expect(page.locator("#jobs-message")).to_contain_text("This server needs an API key")
    give_key(page)

    # A folder name that is HTML: the page shows it as text.
    evil = "<img src=x onerror=window.__pwned=1>"
    source = images(where.root / evil)
    output = where.root / "out-completed"
    job = start_job(where, source, output)
    name = job["name"]

    row = row_of(page, name)
    expect(row.locator(".status-label")).to_have_text("Completed")
    expect(row).to_have_class(re.compile(r"\btone-ok\b"))
    expect(row.locator(".rows-done")).to_have_text(re.compile(r"^8 (of 8 )?done$"))
    expect(row.locator(".rows-rest")).to_have_text("0 failed, 0 skipped")
    expect(row.locator(".job-name code")).to_have_text(short(name))
    expect(row.locator(".job-name code")).to_have_attribute("title", name)
    expect(row.locator(".job-input")).to_have_text(str(source))
    expect(row.locator(".job-output")).to_have_text(str(output / "predictions.csv"))
    expect(row.locator(".job-rate")).to_have_text(re.compile(r"^\d+\.\d$"))
    props = job_now(where, name)
    for column, stamp in (("start", props["startTime"]), ("end", props["endTime"])):
        expect(row.locator(f".job-{column} time")).to_have_attribute("datetime", stamp)
    expect(row.locator("button")).to_have_count(0)  # nothing to cancel
    expect(page.locator(f'#jobs-rows [data-error-of="{name}"]')).to_have_count(0)
    expect(page.locator("#jobs-message")).to_contain_text("completed")
    assert props["status"] == "Completed"
    assert props["progress"]["rowsDone"] == 8

    # Every list request carried the key from the page's field.
    with_key = [r for r in asked if r.all_headers().get("authorization") == f"Bearer {API_KEY}"]
    assert with_key
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#jobs img").count() == 0
    shot(page, screenshots, "jobs-03-completed")

    # Labelled controls, and nothing wider than a phone: the table scrolls on its own.
    assert unlabelled_controls(page, "#jobs input, #jobs button, #jobs progress") == []
    page.set_viewport_size({"width": 360, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    wrap = page.locator("#jobs-table-wrap")
    expect(wrap).to_have_attribute("role", "region")
    assert wrap.evaluate("e => e.scrollWidth > e.clientWidth")
    shot(page, screenshots, "jobs-03-phone")


def test_cancel_button_cancels_a_running_job_and_a_failed_job_says_why(
    jobs_servers: Any,
    context: BrowserContext,
    problems: PageProblems,
    screenshots: Path,
) -> None:
    where = jobs_servers("jobs")
    big = start_job(where, images(where.root / "big", BIG_COPIES), where.root / "out-big")
    # One job runs at a time: this one waits behind the big one; its input then goes, so
    # it fails when its turn comes.
    gone = images(where.root / "gone")
    doomed = start_job(where, gone, where.root / "out-gone")
    assert doomed["properties"]["status"] == "Queued"
    shutil.rmtree(gone)

    page = open_ui(context, where)
    give_key(page)
    running = row_of(page, big["name"])
    expect(running.locator(".status-label")).to_have_text("Running")
    expect(running).to_have_class(re.compile(r"\btone-running\b"))
    expect(running.locator("progress")).to_be_visible()
    queued = row_of(page, doomed["name"])
    expect(queued.locator(".status-label")).to_have_text("Queued")
    expect(queued.get_by_role("button", name=f"Cancel job {short(doomed['name'])}")).to_be_visible()
    shot(page, screenshots, "jobs-04-running")

    running.get_by_role("button", name=f"Cancel job {short(big['name'])}").click()
    expect(running.locator(".status-label")).to_have_text("Canceled")
    expect(running.locator("button")).to_have_count(0)
    expect(page.locator("#jobs-message")).to_be_focused()  # the button went; the keyboard stays
    expect(page.locator("#jobs-error")).to_be_empty()
    props = job_now(where, big["name"])
    assert props["status"] == "Canceled"
    total = BIG_COPIES * len(SCENES)
    assert props["progress"]["rowsDone"] < total
    done = f"{props['progress']['rowsDone']:,} of {total:,} done"
    expect(running.locator(".rows-done")).to_have_text(done)

    # The queued job ran next and failed: the server's reason is on the page.
    expect(queued.locator(".status-label")).to_have_text("Failed")
    error = job_now(where, doomed["name"])["error"]
    assert "does not exist" in error["message"]
    expect(page.locator(f'#jobs-rows [data-error-of="{doomed["name"]}"] .job-error')).to_have_text(
        f"Failed ({error['code']}): {error['message']}"
    )
    expect(queued.locator("button")).to_have_count(0)
    shot(page, screenshots, "jobs-04-canceled-and-failed")


def test_the_newest_20_then_20_more(
    jobs_servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    where = jobs_servers("jobs")
    source = images(where.root / "one-each")
    for n in range(21):  # (with the other tests' jobs, or alone: more than a page)
        start_job(where, source, where.root / f"out-many-{n}")
    count = httpx.get(f"{where.url}/jobs", headers=AUTH, timeout=30).json()["count"]
    assert 20 < count <= 40

    page = open_ui(context, where)
    give_key(page)
    expect(page.locator("#jobs-rows tr.job")).to_have_count(20)
    expect(page.locator("#jobs-message")).to_contain_text(
        f"{count} batch jobs (the newest 20 shown):"
    )
    more = page.get_by_role("button", name="Show 20 more")
    more.click()
    expect(page.locator("#jobs-rows tr.job")).to_have_count(count)
    expect(more).to_be_hidden()
    expect(page.locator("#jobs-message")).to_be_focused()
    expect(page.locator("#jobs-message")).to_contain_text(f"{count} batch jobs:")
    shot(page, screenshots, "jobs-05-more")
