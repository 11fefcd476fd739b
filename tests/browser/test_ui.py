"""``GET /ui``: a person tries the model in a browser, against the real server.

The built-in demo models know the synthetic scenes in ``examples/``; the page must show their
true captions and answers, the server's own error messages, and request snippets that are
the contract (they are run here, as a user would run them).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import BrowserContext, Page, Request, expect

from browser.ui_support import API_KEY, PageProblems, open_ui, unlabelled_controls

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CAPTIONS = {
    row["file_name"]: row["text"]
    for row in map(json.loads, (EXAMPLES / "metadata.jsonl").read_text().splitlines())
}
QUESTIONS = [json.loads(line) for line in (EXAMPLES / "questions.jsonl").read_text().splitlines()]
MARKER = re.compile(r"…\[(\d+) more characters\]$")
SHOWN_CHARS = 40  # of a shortened base64 string (ui.js)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def shot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def score_requests(page: Page) -> list[Request]:
    """The /score requests the page makes from now on."""
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if r.url.endswith("/score") else None)
    return seen


def shown_body(page: Page) -> dict[str, Any]:
    """The request body in the displayed curl snippet (long base64 shortened)."""
    curl = page.locator("#code-curl").inner_text()
    match = re.search(r"<<'JSON'\n(.*)\nJSON$", curl, re.DOTALL)
    assert match, curl
    body: dict[str, Any] = json.loads(match.group(1))
    return body


def unshorten(shown: str, full: str) -> str:
    """The full value a shortened one stands for, after checking the marker is truthful."""
    marker = MARKER.search(shown)
    assert marker, shown
    head = shown[: marker.start()]
    assert len(head) == SHOWN_CHARS
    assert full.startswith(head)
    assert len(full) == SHOWN_CHARS + int(marker.group(1))
    return full


# -- the page itself -----------------------------------------------------------------------


def test_page_is_static_open_and_locked_down(servers: Any) -> None:
    server = servers("demo-key")  # even when the API needs a key, the page does not
    moved = httpx.get(f"{server.url}/ui")
    assert moved.status_code in (307, 308)
    assert moved.headers["location"].endswith("/ui/")
    page = httpx.get(f"{server.url}/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    for asset, kind in (("ui.js", "javascript"), ("ui.css", "text/css")):
        got = httpx.get(f"{server.url}/ui/{asset}")
        assert got.status_code == 200
        assert kind in got.headers["content-type"]
    # nothing is fetched from elsewhere: the server may be offline
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    assert httpx.get(f"{server.url}/ui/nope.js").status_code == 404
    assert "/ui/" in httpx.get(f"{server.url}/swagger.json").json()["info"]["description"]


# -- 1. caption --------------------------------------------------------------------------


def test_caption_of_an_uploaded_example(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    page = open_ui(context, servers("demo"))
    shot(page, screenshots, "01-empty")
    page.set_input_files("#file-input", EXAMPLES / "scene-01.png")
    expect(page.locator("#picked li")).to_have_count(1)
    expect(page.locator("#picked-summary")).to_have_text("1 image chosen (one row each).")
    page.click("#run")
    expect(page.locator("#results .result-text")).to_have_text([CAPTIONS["scene-01.png"]])
    expect(page.locator("#status")).to_have_text(re.compile(r"^Captioned 1 image in \d+ ms"))
    expect(page.locator("#error")).to_be_empty()
    shown = page.locator("#results img")
    expect(shown).to_have_attribute("alt", "Image 0: scene-01.png")
    assert shown.evaluate("img => img.complete && img.naturalWidth > 0")
    expect(page.locator("#code")).to_be_visible()
    shot(page, screenshots, "01-caption")


DROP_AND_PASTE = """([dropped, pasted]) => {
    const file = ({name, data}) =>
        new File([Uint8Array.from(atob(data), c => c.charCodeAt(0))], name, {type: "image/png"});
    const holding = (f) => { const dt = new DataTransfer(); dt.items.add(file(f)); return dt; };
    document.getElementById("drop-zone").dispatchEvent(new DragEvent(
        "drop", {dataTransfer: holding(dropped), bubbles: true, cancelable: true}));
    document.dispatchEvent(new ClipboardEvent(
        "paste", {clipboardData: holding(pasted), bubbles: true, cancelable: true}));
}"""


def test_dropped_and_pasted_images(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    dropped, pasted = EXAMPLES / "scene-06.png", EXAMPLES / "scene-07.png"
    page = open_ui(context, servers("demo"))
    page.evaluate(DROP_AND_PASTE, [{"name": f.name, "data": b64(f)} for f in (dropped, pasted)])
    expect(page.locator("#picked .picked-name")).to_have_text(
        [f"0: {dropped.name}", f"1: {pasted.name}"]
    )
    page.click("#run")
    expect(page.locator("#results .result-text")).to_have_text(
        [CAPTIONS[dropped.name], CAPTIONS[pasted.name]]
    )
    shot(page, screenshots, "01-dropped-and-pasted")


# -- 2. question ---------------------------------------------------------------------------


def test_question_to_demo_vqa(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    qa = QUESTIONS[0]  # as `blipserve ask` is tested: the first example question
    page = open_ui(context, servers("demo-vqa"))
    expect(page.locator("#model-status")).to_contain_text("BLIP-2")
    sent = score_requests(page)
    page.set_input_files("#file-input", EXAMPLES / qa["file_name"])
    expect(page.locator("#question")).to_be_hidden()
    page.check("#mode-question")
    expect(page.locator("#question")).to_be_focused()
    page.keyboard.type(qa["question"])
    page.keyboard.press("Enter")  # submits the form
    expect(page.locator("#results .result-text")).to_have_text([qa["answer"]])
    expect(page.locator("#results .asked")).to_have_text([qa["question"]])
    expect(page.locator("#status")).to_have_text(re.compile(r"^Answered 1 image in \d+ ms"))
    # BLIP-2 gets the question as the chat route and `blipserve ask` give it
    [request] = sent
    body = json.loads(request.post_data or "")
    assert body["input_data"]["columns"] == ["image", "text"]
    assert body["input_data"]["data"][0][1] == f"Question: {qa['question']} Answer:"
    shot(page, screenshots, "02-question")


# -- 3. errors: the server's own message ---------------------------------------------------


def test_non_image_file_shows_the_servers_message(
    servers: Any,
    context: BrowserContext,
    problems: PageProblems,
    screenshots: Path,
    tmp_path: Path,
) -> None:
    server = servers("demo")
    notes = tmp_path / "notes.txt"
    notes.write_text("this is a shopping list, not an image\n")
    body = {"input_data": {"columns": ["image"], "index": [0], "data": [[b64(notes)]]}}
    direct = httpx.post(f"{server.url}/score", json=body, timeout=30)
    assert direct.status_code == 400
    message = direct.json()["message"]

    page = open_ui(context, server)
    page.set_input_files("#file-input", notes)
    page.click("#run")
    expect(page.locator("#error")).to_have_text(f"Error 400: {message}")
    expect(page.locator("#results li")).to_have_count(0)
    expect(page.locator("#status")).to_have_text(re.compile(r"^Failed after \d+ ms"))
    shot(page, screenshots, "03-not-an-image")


def test_refused_url_shows_the_servers_message(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    server = servers("demo")
    url = "http://127.0.0.1:9/scene.png"  # loopback: refused unless --allow-url-host
    body = {"input_data": {"columns": ["image"], "data": [[url]]}}
    message = httpx.post(f"{server.url}/score", json=body, timeout=30).json()["message"]

    page = open_ui(context, server)
    page.fill("#url-input", "not a url")
    page.press("#url-input", "Enter")
    expect(page.locator("#error")).to_contain_text("is not a URL")
    expect(page.locator("#picked li")).to_have_count(0)
    page.fill("#url-input", url)
    page.press("#url-input", "Enter")  # Enter adds the URL
    expect(page.locator("#picked li")).to_have_count(1)
    expect(page.locator("#error")).to_be_empty()
    page.click("#run")
    expect(page.locator("#error")).to_have_text(re.compile(rf"^Error 400: {re.escape(message)}"))
    shot(page, screenshots, "03-refused-url")


def test_user_text_is_never_html(
    servers: Any,
    context: BrowserContext,
    problems: PageProblems,
    screenshots: Path,
    tmp_path: Path,
) -> None:
    """File names, server messages and answers reach the DOM as text only."""
    evil = '<img src=x onerror="window.__pwned=1">'
    scene = tmp_path / f"{evil}.png"
    scene.write_bytes((EXAMPLES / "scene-04.png").read_bytes())
    junk = tmp_path / f"{evil}.txt"
    junk.write_text("<script>window.__pwned=2</script>")

    page = open_ui(context, servers("demo"))
    page.set_input_files("#file-input", [scene, junk])
    names = page.locator("#picked .picked-name")
    expect(names).to_have_text([f"0: {scene.name}", f"1: {junk.name}"])
    page.click("#run")
    expect(page.locator("#error")).to_contain_text(f"[row 1 is {junk.name}]")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#picked img[src='x'], #error img").count() == 0
    shot(page, screenshots, "03-escaped")


# -- 4. API key ----------------------------------------------------------------------------


def test_api_key_needed_then_given(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    page = open_ui(context, servers("demo-key"))
    page.set_input_files("#file-input", EXAMPLES / "scene-02.png")
    page.click("#run")
    error = page.locator("#error")
    expect(error).to_contain_text("This server needs an API key (missing API key")
    expect(error).to_contain_text("Enter it in the “API key” field")
    expect(page.locator("#api-key")).to_be_focused()
    shot(page, screenshots, "04-key-missing")

    page.keyboard.type("not-the-key")
    page.keyboard.press("Enter")
    expect(error).to_contain_text("This server needs an API key (wrong API key)")

    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#results .result-text")).to_have_text([CAPTIONS["scene-02.png"]])
    expect(error).to_be_empty()
    shot(page, screenshots, "04-key-given")

    # The key stays in the page's memory: not stored, not shown in the snippets.
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert context.cookies() == []
    for snippet in ("curl", "requests", "openai"):
        text = page.locator(f"#code-{snippet}").text_content() or ""
        assert API_KEY not in text
        assert "BLIPSERVE_API_KEY" in text
    page.reload()
    expect(page.locator("#api-key")).to_have_value("")


# -- 5. several images -----------------------------------------------------------------------


def test_several_images_make_a_grid_from_one_request(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    images = sorted(EXAMPLES.glob("scene-*.png"))
    page = open_ui(context, servers("demo"))
    sent = score_requests(page)
    page.set_input_files("#file-input", images)
    expect(page.locator("#picked li")).to_have_count(len(images))
    page.click("#run")
    expect(page.locator("#results .result-text")).to_have_text(
        [CAPTIONS[image.name] for image in images]
    )
    expect(page.locator("#results img")).to_have_count(len(images))
    expect(page.locator("#status")).to_have_text(re.compile(rf"^Captioned {len(images)} images"))
    assert len(sent) == 1
    body = json.loads(sent[0].post_data or "")
    assert body["input_data"]["index"] == list(range(len(images)))
    assert body["input_data"]["data"] == [[b64(image)] for image in images]
    shot(page, screenshots, "05-grid")


# -- 6. the snippets are the contract ----------------------------------------------------------


def run_snippet(args: list[str], stdin: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "BLIPSERVE_API_KEY"}
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(proxy, None)  # loopback only
    out = subprocess.run(
        args, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def copied(page: Page, snippet: str) -> str:
    page.click(f"#tab-{snippet}")
    page.click(f"#panel-{snippet} button.copy")
    expect(page.locator("#copy-status")).to_contain_text(f"Copied the full {snippet} snippet")
    text: str = page.evaluate("navigator.clipboard.readText()")
    return text


def test_snippets_are_the_contract_and_run(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    server = servers("demo-vqa")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    images = [EXAMPLES / "scene-02.png", EXAMPLES / "scene-03.png"]
    question = "how many objects are there?"
    answer = {(q["file_name"], q["question"]): q["answer"] for q in QUESTIONS}
    truth = [answer[image.name, question] for image in images]
    page = open_ui(context, server)
    sent = score_requests(page)
    page.set_input_files("#file-input", images)
    page.check("#mode-question")
    page.fill("#question", question)
    page.fill("#max-new-tokens", "10")
    page.fill("#num-beams", "2")
    page.click("#run")
    expect(page.locator("#results .result-text")).to_have_count(len(images))
    said = page.locator("#results .result-text").all_text_contents()
    answers = [{"text": t} for t in said]

    # The displayed body is the contract, with long base64 visibly shortened...
    shown = shown_body(page)
    rows = shown["input_data"]["data"]
    assert shown == {
        "input_data": {
            "columns": ["image", "text"],
            "index": [0, 1],
            "data": [[row[0], f"Question: {question} Answer:"] for row in rows],
        },
        "params": {"max_new_tokens": 10, "num_beams": 2},
    }
    for row, image in zip(rows, images, strict=True):
        row[0] = unshorten(row[0], b64(image))
    # ... and, filled in, exactly what the page sent; posted by hand it gets the same answer.
    assert json.loads(sent[0].post_data or "") == shown
    assert httpx.post(f"{server.url}/score", json=shown, timeout=60).json() == answers
    # The Python snippet holds the same body, as a Python literal.
    requests_text = page.locator("#code-requests").inner_text()
    literal = re.search(r"^body = (.*?)\n\}\n", requests_text, re.DOTALL | re.MULTILINE)
    assert literal, requests_text
    shown_py = ast.literal_eval(literal.group(1) + "\n}")
    for row, image in zip(shown_py["input_data"]["data"], images, strict=True):
        row[0] = unshorten(row[0], b64(image))
    assert shown_py == shown
    shot(page, screenshots, "06-snippets")

    # Copy gives the full snippets; run as they are, they print the page's answers.
    curl = copied(page, "curl")
    assert "more characters]" not in curl
    assert json.loads(run_snippet(["bash", "-s"], stdin=curl)) == answers
    printed = run_snippet([sys.executable, "-c", copied(page, "requests")])
    assert printed.strip() == f"200 {answers!r}"
    printed = run_snippet([sys.executable, "-c", copied(page, "openai")])
    assert printed.splitlines() == said
    expect(page.locator("#tab-openai")).to_have_attribute("aria-selected", "true")
    shot(page, screenshots, "06-openai-tab")
    # (Whether what they said is true is demo-vqa's accuracy, measured by
    # tests/integration/test_demo_models.py; this test is about the page and the contract.)
    assert len(said) == len(truth)


# -- accessibility and phones --------------------------------------------------------------------


def test_labelled_keyboard_usable_and_fits_a_phone(
    servers: Any, context: BrowserContext, problems: PageProblems, screenshots: Path
) -> None:
    page = open_ui(context, servers("demo"), width=360)
    assert unlabelled_controls(page, "input, button, select, textarea") == []
    expect(page.locator("#live")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#error")).to_have_attribute("role", "alert")

    # Tab order follows the form, top to bottom.
    order = []
    for _ in range(9):
        page.keyboard.press("Tab")
        order.append(page.evaluate("(e => e.id || e.textContent)(document.activeElement)"))
    assert order == [
        "API reference",
        "file-input",
        "url-input",
        "add-url",
        "mode-caption",
        "max-new-tokens",
        "num-beams",
        "api-key",
        "run",
    ]
    # Keyboard only: the file input is the drop zone's control; Enter on Run runs.
    page.set_input_files("#file-input", EXAMPLES / "scene-05.png")
    page.focus("#run")
    page.keyboard.press("Enter")
    expect(page.locator("#results .result-text")).to_have_text([CAPTIONS["scene-05.png"]])
    # Nothing wider than the phone's screen.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, screenshots, "07-phone")
