"""The trace viewer (`gymrl traces serve`).

Fast: pagination, filters, 404s and escaping on a synthetic store of a few thousand rollouts, through
starlette's TestClient. Browser: a real 2-step GRPO run on the shared engine, plus one rollout whose
response, tool call and tool result are hostile HTML, viewed in headless Chromium (Debian's package,
driven by Playwright; `make test` installs it): the runs page, the reward curves, filters, paging, a
rollout's turns and coloured tokens, and the hostile rollout shown as text with no script run.
Set GYMRL_VIEWER_SCREENSHOTS=DIR to keep screenshots of the pages.
"""

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader, TraceRecord, TraceWriter
from gymrl.traces.viewer import PAGE_SIZE, create_app, is_loopback, token_texts

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'
HOSTILE = f"I found it: {SCRIPT} {IMG}"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def hostile_record(step: int, token_ids: list[int] | None = None) -> TraceRecord:
    """A tool-use rollout whose every model- or environment-written field is hostile HTML."""
    tool_args = json.dumps({"key": SCRIPT})
    ids = token_ids or list(range(40, 60))
    return TraceRecord(
        step=step, split="train", env="tool_use", task_id="hostile", sample=0, reward=1.0, reason=f"matched {IMG}",
        finish_reason="stop", policy_version=step, engine_id=0,
        prompt=[{"role": "user", "content": f"Look up the key {SCRIPT}"}],
        turns=[{"role": "assistant", "content": HOSTILE, "tool_calls": [{"name": "kv_get", "arguments": tool_args}]},
               {"role": "tool", "name": "kv_get", "content": IMG},
               {"role": "assistant", "content": HOSTILE}],
        response=HOSTILE, prompt_ids=[1, 2, 3], completion_ids=ids,
        mask=[1] * (len(ids) // 2) + [0] * (len(ids) - len(ids) // 2),  # the second half: a tool result
        logprobs=[-0.01 * i for i in range(len(ids))], versions=[step] * len(ids),
        breakdown={f"<b>{IMG}</b>": 1.0}, timings={"generate": 0.5, "tools": 0.1, "verify": 0.01},
    )


# ---- fast: a synthetic store ------------------------------------------------------------------------

SYNTHETIC = 2345
FINISH = ("stop", "stop", "length", "max_turns")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run = runs / "synth"
    writer = TraceWriter(run / TRACE_FILE, {"config": {"model": {"path": "/nowhere"}}, "git_revision": "abc123",
                                            "versions": {"gymrl": "0.1.0"}, "started": time.time()})
    for i in range(SYNTHETIC):
        writer.write(TraceRecord(
            step=i // 100, split="eval" if i % 10 == 0 else "train", env=("alpha", "beta")[i % 2],
            task_id=str(i % 37), sample=i % 8, reward=(i % 4) / 3, reason="ok", finish_reason=FINISH[i % 4],
            policy_version=i // 100, engine_id=0, prompt=[{"role": "user", "content": "q"}],
            turns=[{"role": "assistant", "content": f"answer {i}"}], response=f"answer {i}", prompt_ids=[1, 2],
            completion_ids=[3, 4, 5], mask=[1, 1, 0], logprobs=[-0.01, -1.0, 0.0], versions=[0, 0, 0],
            breakdown={}, timings={},
        ))
    hostile_id = writer.write(hostile_record(23))
    writer.close()
    metrics = [{"step": s, "reward_mean": s / 30, "reward/alpha": s / 25, "reward/beta": s / 40} for s in range(24)]
    for row in metrics[::5]:
        row |= {"eval_reward": row["step"] / 30, "eval_reward/alpha": row["step"] / 30, "eval_reward/beta": 0.5}
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return SimpleNamespace(runs=runs, run=run, hostile_id=hostile_id, total=SYNTHETIC + 1)


@pytest.fixture(scope="module")
def client(synthetic):
    return TestClient(create_app(synthetic.runs))


def count_line(html: str) -> str:
    return re.search(r'<span id="count">(.*?)</span>', html).group(1)


def row_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<a href="/run/synth/rollout/(\d+)">', html)]


def test_table_is_paginated_on_the_server(client, synthetic):
    first = client.get("/run/synth").text
    assert count_line(first) == f"rollouts 1–{PAGE_SIZE} of {synthetic.total}"
    assert row_ids(first) == list(range(1, PAGE_SIZE + 1))
    pages = -(-synthetic.total // PAGE_SIZE)
    last = client.get(f"/run/synth?page={pages}").text
    assert row_ids(last) == list(range((pages - 1) * PAGE_SIZE + 1, synthetic.total + 1))
    assert 'class="next"' not in last and 'class="prev"' in last
    assert row_ids(client.get("/run/synth?page=100000").text) == row_ids(last)  # past the end: the last page

    # Filters are query parameters; the next link keeps them.
    query = "env=alpha&min_reward=0.5&split=train"
    expected = TraceReader(synthetic.run / TRACE_FILE).count(TraceFilter(env="alpha", min_reward=0.5, split="train"))
    filtered = client.get(f"/run/synth?{query}").text
    assert count_line(filtered) == f"rollouts 1–{PAGE_SIZE} of {expected} (of {synthetic.total})"
    next_link = re.search(r'<a class="next" href="\?([^"]+)"', filtered).group(1).replace("&amp;", "&")
    assert dict(p.split("=") for p in next_link.split("&")) == {"env": "alpha", "min_reward": "0.5", "split": "train",
                                                                "page": "2"}
    api = client.get(f"/api/run/synth/rollouts?{query}&page=2").json()
    assert api["total"] == expected and len(api["rows"]) == PAGE_SIZE
    assert all(r["env"] == "alpha" and r["reward"] >= 0.5 and r["split"] == "train" for r in api["rows"])
    assert [r["id"] for r in api["rows"]] == row_ids(client.get(f"/run/synth?{next_link}").text)

    newest = client.get("/api/run/synth/rollouts?order=-id&finish_reason=length&text=answer 1").json()
    assert newest["rows"][0]["id"] > newest["rows"][-1]["id"]
    assert all(r["finish_reason"] == "length" and "answer 1" in r["response"] for r in newest["rows"])
    bad = client.get("/run/synth?min_reward=lots&page=x").text
    assert "min_reward: &#39;lots&#39; is not a number; ignored" in bad
    assert count_line(bad) == f"rollouts 1–{PAGE_SIZE} of {synthetic.total}"


def test_unknown_runs_rollouts_and_paths_are_404(client, synthetic):
    for url in ["/run/nope", "/run/nope/rollout/1", f"/run/synth/rollout/{synthetic.total + 1}", "/run/..%2Fsynth",
                "/nothing/here"]:
        response = client.get(url)
        assert response.status_code == 404, url
        assert "<h1>404: not found</h1>" in response.text
    assert client.get("/api/run/synth/rollout/999999").json() == {"error": "no rollout 999999 in run 'synth'"}
    assert client.get("/run/synth/rollout/abc").status_code == 404


def test_pages_escape_model_text_and_forbid_scripts(client, synthetic):
    pages = ["/", "/run/synth?env=tool_use", f"/run/synth/rollout/{synthetic.hostile_id}"]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200
        assert "script-src 'none'" in response.headers["content-security-policy"]
        assert "<script" not in response.text and "<img" not in response.text and "<b>" not in response.text
    html = client.get(pages[2]).text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;" in html
    record = client.get(f"/api/run/synth/rollout/{synthetic.hostile_id}").json()
    assert record["response"] == HOSTILE  # the JSON twin returns the text as stored


def test_run_page_draws_a_reward_curve_per_environment(client):
    html = client.get("/run/synth").text
    titles = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert titles == ["all environments", "alpha", "beta"]
    assert html.count('<polyline class="train"') == 3 and html.count('<polyline class="eval"') == 3
    assert html.count('<circle class="eval"') == 3 * 5  # evaluations at steps 0, 5, 10, 15, 20
    runs = client.get("/api/runs").json()
    assert [(r["name"], r["rollouts"], r["steps"], r["envs"]) for r in runs] == [
        ("synth", SYNTHETIC + 1, 23, ["alpha", "beta", "tool_use"])]


def test_token_texts_put_a_split_character_on_its_last_token():
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731 (token id = one byte)
    assert token_texts(decode, list("aé!".encode())) == ["a", "", "é", "!"]
    assert "".join(token_texts(decode, [0xFF, ord("a")])) == "\ufffda"  # an invalid byte stays a replacement


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.8.0.1", "::1", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "192.168.1.4", "example.org", "::"])


# ---- in a real browser, on a real run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(reset_session, tmp_path_factory):
    """Two GRPO steps on the shared engine into ``<runs>/real``, plus one hostile tool-use rollout."""
    from gymrl.train.loop import train

    session = reset_session()
    cfg = session.cfg
    runs = tmp_path_factory.mktemp("viewer_runs")
    session.cfg = cfg.model_copy(update={"run_dir": runs / "real",
                                         "train": cfg.train.model_copy(update={"steps": 2}),
                                         "eval": cfg.eval.model_copy(update={"every": 1})})
    try:
        train(session)
    finally:
        session.cfg = cfg
    path = runs / "real" / TRACE_FILE
    with_tokens = session.tokenizer(HOSTILE, add_special_tokens=False)["input_ids"]
    writer = TraceWriter(path, TraceReader(path).metadata())
    hostile_id = writer.write(hostile_record(2, with_tokens + with_tokens))
    writer.close()
    return SimpleNamespace(runs=runs, reader=TraceReader(path), hostile_id=hostile_id, tokenizer=session.tokenizer)


@pytest.fixture(scope="module")
def viewer(real_run):
    """The viewer on a free loopback port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(real_run.runs), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the viewer did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, viewer):
    """A fresh page that records dialogs, Content-Security-Policy reports and every URL it requests."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.dialogs, page.csp_errors, page.requests = [], [], []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: "Content Security Policy" in m.text and page.csp_errors.append(m.text))
    page.on("request", lambda r: page.requests.append(r.url))
    page.set_default_timeout(15_000)
    yield page
    context.close()


def screenshot(page, name: str) -> None:
    folder = os.environ.get("GYMRL_VIEWER_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"viewer_{name}.png"), full_page=True)


def shown_count(page) -> str:
    return page.locator("#count").inner_text()


@pytest.mark.engine
def test_browser_runs_page_reward_curves_filter_and_paging(page, viewer, real_run):
    reader = real_run.reader
    total = reader.count()
    page.goto(viewer + "/")
    row = page.locator("table.runs tbody tr")
    assert row.count() == 1 and row.locator("td").nth(1).inner_text() == str(total)
    row.get_by_role("link", name="real").click()
    page.wait_for_url("**/run/real")

    curve = page.locator("svg.reward-curve").first
    assert curve.is_visible()
    assert page.locator("figcaption").all_inner_texts() == ["arithmetic"]  # the run's only environment
    assert page.locator("svg.reward-curve polyline.train").first.get_attribute("points").count(",") == 2  # 2 steps
    assert page.locator("svg.reward-curve circle.eval").count() >= 3  # before training, after steps 1 and 2
    assert shown_count(page) == f"rollouts 1–{PAGE_SIZE} of {total}"
    screenshot(page, "run")

    # Filter: environment and minimum reward; the table shows only matching rows and the count drops.
    page.select_option("select[name=env]", "arithmetic")
    page.fill("input[name=min_reward]", "1")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**min_reward=1**")
    expected = reader.count(TraceFilter(env="arithmetic", min_reward=1.0))
    assert 0 < expected < total - 1
    assert shown_count(page) == f"rollouts 1–{min(expected, PAGE_SIZE)} of {expected} (of {total})"
    envs = page.locator("table.rollouts td.env").all_inner_texts()
    rewards = [float(r) for r in page.locator("table.rollouts td.reward").all_inner_texts()]
    assert len(envs) == min(expected, PAGE_SIZE) and set(envs) == {"arithmetic"} and min(rewards) >= 1

    # Page forward on everything.
    page.get_by_role("link", name="clear").click()
    page.wait_for_url(viewer + "/run/real")
    first_page_ids = page.locator("table.rollouts tbody tr td:first-child").all_inner_texts()
    page.locator("a.next").click()
    page.wait_for_url("**page=2")
    assert shown_count(page) == f"rollouts {PAGE_SIZE + 1}–{2 * PAGE_SIZE} of {total}"
    second_page_ids = page.locator("table.rollouts tbody tr td:first-child").all_inner_texts()
    assert [int(i) for i in second_page_ids] == [int(i) + PAGE_SIZE for i in first_page_ids]
    assert not page.dialogs and not page.csp_errors


@pytest.mark.engine
def test_browser_rollout_page_shows_turns_and_coloured_tokens(page, viewer, real_run):
    page.goto(viewer + "/run/real?split=train")
    link = page.locator("table.rollouts tbody tr td:first-child a").first
    rollout_id = int(link.inner_text())
    link.click()
    page.wait_for_url(f"**/run/real/rollout/{rollout_id}")
    record = real_run.reader.rollout(rollout_id)

    assert page.locator("#reward").inner_text() == f"{record.reward:g}"
    assert page.locator("#reason").inner_text() == record.reason
    user = next(m["content"] for m in record.prompt if m["role"] == "user")
    assert page.locator(".turn.user pre").first.inner_text() == user
    assert page.locator(".turn.assistant pre").first.inner_text() == record.response
    tokens = page.locator("#tokens span.tok")
    assert tokens.count() == len(record.completion_ids)
    # Decoded with the run's tokenizer (its checkpoint): the spans spell the completion.
    spelled = "".join(tokens.all_text_contents()).replace("\u21b5", "")
    assert spelled == real_run.tokenizer.decode(record.completion_ids, skip_special_tokens=False)
    first = tokens.first
    assert re.fullmatch(rf"tok lp\d v{record.versions[0]}", first.get_attribute("class"))
    assert first.get_attribute("title").startswith(f"logprob {record.logprobs[0]:.4f}")
    screenshot(page, "rollout")
    background = "el => getComputedStyle(el).backgroundColor"
    by_logprob = first.evaluate(background)
    page.get_by_text("colour by policy version").click()
    assert first.evaluate(background) != by_logprob  # coloured by version now
    assert page.locator(".ver-legend").is_visible() and not page.locator(".lp-legend").is_visible()
    assert not page.dialogs and not page.csp_errors


@pytest.mark.engine
def test_browser_hostile_rollout_is_shown_as_text_and_never_runs(page, viewer, real_run):
    page.goto(viewer + "/run/real?env=tool_use")
    assert page.locator("table.rollouts td.response").first.inner_text().startswith("I found it: <script>")
    page.get_by_role("link", name=str(real_run.hostile_id), exact=True).click()
    page.wait_for_url(f"**/rollout/{real_run.hostile_id}")

    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert page.locator("script").count() == 0 and page.locator("main img").count() == 0
    assert page.locator(".turn.assistant pre.content").first.inner_text() == HOSTILE
    assert page.locator(".turn.tool pre").inner_text() == IMG
    assert SCRIPT in page.locator(".tool-call pre").inner_text()
    assert page.locator("#reason").inner_text() == f"matched {IMG}"
    assert page.locator(".turn.user pre").inner_text() == f"Look up the key {SCRIPT}"
    spelled = "".join(page.locator("#tokens span.tok").all_text_contents())
    assert spelled == HOSTILE + HOSTILE  # the token view too: decoded text, escaped
    assert page.locator("#tokens span.tok.env").count() > 0  # the tool result's tokens, greyed
    screenshot(page, "hostile")
    assert not page.dialogs, page.dialogs
    assert not page.csp_errors, page.csp_errors  # nothing was even attempted
    assert all(url.startswith(viewer) and not url.endswith("/x") for url in page.requests), page.requests
