"""The web console beside the chat, in a real headless Chromium against the session stack
(`smol` and `gemma`): two answers streamed side by side, continued and regenerated, a vote that
is stored and moves the leaderboard, random two with the names hidden until the vote, the export
in FastChat's battle-log shape, the operations view's charts from live traffic, a model on
demand loaded, pinned, unpinned and unloaded from the page with its host's memory against the
budget; and, over HTTP, votes per key and prompt logging off (hashes only), and the day's 429s
per key surviving a restart of the API server."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from conftest import Procs, Stack
from llmrelay.api.keys import add_key

test_webui = pytest.importorskip("test_webui")  # skips where Chromium is missing

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402

until, open_chat, new_browser = test_webui.until, test_webui.open_chat, test_webui.new_browser
BATTLE_KEYS = {"question_id", "model_a", "model_b", "winner", "judge", "conversation_a",
               "conversation_b", "turn", "anony", "language", "tstamp"}
SHOTS = os.environ.get("LLMRELAY_WEBUI_SCREENSHOT")  # docs/webui.png: the console's beside it


browser = test_webui.browser  # the same module-scoped headless Chromium fixture


def shot(d: WebDriver, name: str) -> None:
    if SHOTS:
        d.save_screenshot(str(Path(SHOTS).with_name(name)))


def answers(d: WebDriver, side: str) -> list:  # type: ignore[type-arg]
    return d.find_elements(By.CSS_SELECTOR, f"#msgs-{side} .msg.assistant")


def both_done(d: WebDriver, turns: int) -> bool:
    return all(len(answers(d, s)) == turns and answers(d, s)[-1].get_attribute("data-state")
               in ("done", "error") for s in "ab")


def ask_both(d: WebDriver, text: str, turns: int) -> None:
    box = d.find_element(By.ID, "cmp-input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    until(d, lambda: both_done(d, turns), f"both answers of turn {turns}")
    for s in "ab":
        bubble = answers(d, s)[-1]
        assert bubble.get_attribute("data-state") == "done", bubble.text
        assert bubble.find_element(By.CLASS_NAME, "body").text.strip()


def compare_view(d: WebDriver, url: str, max_tokens: int = 16) -> None:
    open_chat(d, url)
    d.find_element(By.ID, "tab-compare").click()
    d.execute_script("document.getElementById('cmp-max-tokens').value = arguments[0];",
                     str(max_tokens))


def board(api: str, **params: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(api + "/api/arena/leaderboard", params=params).json()


def row(data: dict, model: str) -> dict:  # type: ignore[type-arg]
    return next((r for r in data["models"] if r["model"] == model),
                {"votes": 0, "wins": 0, "rating": None})


def test_side_by_side_vote_moves_the_leaderboard(stack: Stack, browser: WebDriver) -> None:
    d = browser
    before = board(stack.api)
    compare_view(d, stack.api)
    Select(d.find_element(By.ID, "cmp-model-a")).select_by_value("smol")
    Select(d.find_element(By.ID, "cmp-model-b")).select_by_value("gemma")
    d.execute_script("""
        window.__grown = {a: 0, b: 0};
        for (const s of ['a', 'b']) new MutationObserver(() => { window.__grown[s]++; })
          .observe(document.getElementById('msgs-' + s),
                   {subtree: true, childList: true, characterData: true});""")
    ask_both(d, "Name a colour.", 1)
    grown = d.execute_script("return window.__grown")
    assert grown["a"] >= 4 and grown["b"] >= 4, grown  # both streamed, not one final render
    assert d.find_element(By.ID, "name-a").text == "smol"
    assert d.find_element(By.ID, "name-b").text == "gemma"
    ask_both(d, "And another one?", 2)  # both conversations go on
    # regenerate the right side: its last answer is replaced, the left one stays
    left = answers(d, "a")[-1].find_element(By.CLASS_NAME, "body").text
    d.find_element(By.ID, "regen-b").click()
    until(d, lambda: both_done(d, 2) and not d.find_element(By.ID, "vote-a").get_attribute(
        "disabled"), "the regenerated answer")
    assert answers(d, "a")[-1].find_element(By.CLASS_NAME, "body").text == left
    shot(d, "console-compare.png")

    d.find_element(By.ID, "vote-a").click()
    result = d.find_element(By.ID, "vote-result")
    until(d, lambda: "Voted" in result.text, "the vote to be stored", 30)
    after = board(stack.api)
    assert after["votes"] == before["votes"] + 1
    assert row(after, "smol")["wins"] == row(before, "smol")["wins"] + 1
    if row(before, "smol")["rating"] is not None:  # two models: a win raises the winner
        assert row(after, "smol")["rating"] > row(before, "smol")["rating"]

    d.find_element(By.ID, "tab-board").click()
    rows = lambda: d.find_elements(By.CSS_SELECTOR, "#board-table tbody tr")  # noqa: E731
    until(d, lambda: {r.get_attribute("data-model") for r in rows()} == {"smol", "gemma"},
          "the leaderboard rows", 30)
    smol = d.find_element(By.CSS_SELECTOR, "#board-table tr[data-model=smol]")
    cells = [td.text for td in smol.find_elements(By.TAG_NAME, "td")]
    assert int(cells[4]) == row(after, "smol")["votes"] and int(cells[5]) == row(after, "smol")["wins"]
    assert smol.find_elements(By.CSS_SELECTOR, "svg.ci circle")
    shot(d, "console-leaderboard.png")

    lines = httpx.get(stack.api + "/api/arena/battles").text.splitlines()
    last = json.loads(lines[-1])
    assert all(set(json.loads(line)) == BATTLE_KEYS for line in lines)
    assert (last["model_a"], last["model_b"], last["winner"], last["anony"], last["turn"]) == (
        "smol", "gemma", "model_a", False, 2)
    assert [m["role"] for m in last["conversation_a"]] == ["user", "assistant"] * 2
    assert last["conversation_a"][0]["content"] == "Name a colour."


def test_random_two_hides_the_names_until_the_vote(stack: Stack, browser: WebDriver) -> None:
    d = browser
    compare_view(d, stack.api)
    d.find_element(By.ID, "cmp-anon").click()
    assert not d.find_element(By.ID, "cmp-model-a").is_displayed()
    ask_both(d, "Say hello.", 1)
    assert [d.find_element(By.ID, f"name-{s}").text for s in "ab"] == ["Model A", "Model B"]
    page = d.find_element(By.ID, "compare-view").text
    assert "smol" not in page and "gemma" not in page
    d.find_element(By.ID, "vote-bad").click()
    result = d.find_element(By.ID, "vote-result")
    until(d, lambda: "Voted" in result.text, "the vote to be stored", 30)
    names = [d.find_element(By.ID, f"name-{s}").text for s in "ab"]
    assert set(names) == {"smol", "gemma"}
    last = json.loads(httpx.get(stack.api + "/api/arena/battles").text.splitlines()[-1])
    assert (last["model_a"], last["model_b"]) == tuple(names)
    assert last["anony"] is True and last["winner"] == "tie (bothbad)"


def test_operations_view_draws_live_charts(stack: Stack, browser: WebDriver) -> None:
    client = stack.client()
    for _ in range(3):
        client.chat.completions.create(model="smol", max_tokens=24, messages=[
            {"role": "user", "content": "Count to ten."}])
    d = browser
    open_chat(d, stack.api)
    d.find_element(By.ID, "tab-ops").click()

    def chart(name: str):  # type: ignore[no-untyped-def]
        return d.find_element(By.CSS_SELECTOR, f"#chart-{name} svg")

    until(d, lambda: float(chart("tokens").get_attribute("data-max")) > 0, "tokens per second", 60)
    assert chart("tokens").find_elements(By.CSS_SELECTOR, "path[data-name=smol]")
    # one line per worker: the stack's three, and any another module started on its controller
    assert int(chart("queue").get_attribute("data-lines")) >= 3
    assert int(chart("running").get_attribute("data-lines")) >= 3
    assert chart("ttft").find_elements(By.CSS_SELECTOR, "path[data-name='smol p95']")
    keys = d.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")
    until(d, lambda: any(r.find_element(By.TAG_NAME, "td").text == "anonymous"
                         for r in d.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")),
          "today's usage of the server without keys", 30)
    assert keys is not None
    shot(d, "console-operations.png")


def test_votes_per_key_and_hashes_without_prompt_logging(stack: Stack, procs: Procs,
                                                        tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    admin, alice, bob = (add_key(keys, "admin", admin=True), add_key(keys, "alice"),
                         add_key(keys, "bob", models=["smol"]))
    _, api = procs.api(stack.controller, extra=("--api-keys-file", str(keys), "--data-dir",
                                                str(tmp_path / "data"), "--no-arena-prompt-log"))
    conv = [{"role": "user", "content": "secret prompt"}, {"role": "assistant", "content": "hi"}]

    def as_key(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    vote = {"model_a": "smol", "model_b": "gemma", "winner": "model_a", "conversation_a": conv,
            "conversation_b": conv}
    assert httpx.post(api + "/api/arena/votes", json=vote).status_code == 401
    assert httpx.post(api + "/api/arena/votes", json=vote, headers=as_key(alice)).status_code == 200
    # bob may not use gemma: as if it did not exist
    r = httpx.post(api + "/api/arena/votes", json=vote, headers=as_key(bob))
    assert r.status_code == 404 and r.json()["error"]["param"] == "model_b"
    r = httpx.post(api + "/api/arena/votes", json={**vote, "winner": "left"}, headers=as_key(alice))
    assert r.status_code == 400 and "winner" in r.text
    assert httpx.post(api + "/api/arena/votes", json={**vote, "winner": "tie"},
                      headers=as_key(admin)).status_code == 200

    every = httpx.get(api + "/api/arena/battles", headers=as_key(admin)).text.splitlines()
    assert [json.loads(line)["judge"] for line in every] == ["alice", "admin"]
    assert "secret prompt" not in "".join(every)
    assert json.loads(every[0])["conversation_a"][0] == {
        "role": "user", "sha256": hashlib.sha256(b'"secret prompt"').hexdigest()}
    # a key that is not an admin sees its own votes only, whatever it asks for
    mine = httpx.get(api + "/api/arena/leaderboard", params={"key": "admin"},
                     headers=as_key(alice)).json()
    assert (mine["votes"], mine["key"], mine["keys"]) == (1, "alice", [])
    assert httpx.get(api + "/api/arena/leaderboard", params={"key": "alice"},
                     headers=as_key(admin)).json()["votes"] == 1
    assert httpx.get(api + "/api/arena/leaderboard", headers=as_key(admin)).json()["keys"] == [
        "admin", "alice"]
    r = httpx.get(api + "/api/arena/leaderboard", params={"since": "yesterday"},
                  headers=as_key(admin))
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"
    assert httpx.get(api + "/api/arena/leaderboard", params={"since": "2999-01-01"},
                     headers=as_key(admin)).json()["votes"] == 0
    # the operations view is the admin's
    assert httpx.get(api + "/api/ops/series", headers=as_key(alice)).status_code == 403
    assert httpx.get(api + "/api/ops/series", headers=as_key(admin)).status_code == 200


def test_429s_of_the_day_per_key_survive_a_restart(stack: Stack, procs: Procs,
                                                   tmp_path: Path) -> None:
    """The keys table's 429s are today's, per key and limit, kept in the usage store: an API
    server killed (SIGKILL) and started again on the same data folder shows them still."""
    keys = tmp_path / "keys.toml"
    admin, carol = add_key(keys, "admin", admin=True), add_key(keys, "carol",
                                                               requests_per_minute=1)
    args = ("--api-keys-file", str(keys), "--data-dir", str(tmp_path / "data"))
    server, api = procs.api(stack.controller, extra=args)
    ask = {"model": "smol", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    carol_h, admin_h = {"Authorization": f"Bearer {carol}"}, {"Authorization": f"Bearer {admin}"}
    assert httpx.post(api + "/v1/chat/completions", json=ask, headers=carol_h,
                      timeout=60).status_code == 200
    for _ in range(2):
        assert httpx.post(api + "/v1/chat/completions", json=ask, headers=carol_h).status_code == 429

    def carols(url: str) -> dict:  # type: ignore[type-arg]
        data = httpx.get(url + "/api/ops/keys", headers=admin_h).json()
        return next(k for k in data["keys"] if k["key"] == "carol")

    row = carols(api)
    assert (row["requests"], row["rate_limited"], row["limits"]) == (
        1, {"requests": 2}, {"requests_per_minute": 1})
    server.kill()  # nothing gets to write at exit: the 429s were committed as they were sent
    _, api = procs.api(stack.controller, extra=args)
    assert carols(api)["rate_limited"] == {"requests": 2}


def test_operations_view_loads_pins_and_unloads_a_model_on_demand(procs: Procs,
                                                                   tmp_path: Path) -> None:
    """A host of its own (so the shared stack's model list stays two): the model's row says
    unloaded, the page's load button loads it through the host's admin endpoint, the host's
    memory against its budget follows, pin pins it (the row and the host say so), unpin
    unpins it, unload unloads it."""
    from llmrelay.worker.managed import free_port

    _, controller = procs.controller()
    catalog = tmp_path / "models.toml"
    catalog.write_text('[[model]]\nmodel_names = ["od-smol"]\nmodel_path = "smollm2"\n'
                       'context_length = 512\nlimit_worker_concurrency = 1\nn_threads = 1\n')
    host = f"http://127.0.0.1:{free_port()}"
    procs._start("host", ["host", "--port", host.rsplit(":", 1)[1], "--controller-address",
                          controller, "--heartbeat-interval", "1", "--catalog", str(catalog),
                          "--admin-key", "adm-web", "--shutdown-timeout", "10"])
    _, api = procs.api(controller, extra=("--host-admin-key", "adm-web"))
    d = new_browser(tmp_path / "profile")
    try:
        d.get(api + "/")
        d.find_element(By.ID, "tab-ops").click()

        def state() -> str | None:  # read in one step: the rows are redrawn every 2 s
            return d.execute_script("const r = document.querySelector("
                                    "'#ondemand-table tr[data-model=od-smol]');"
                                    "return r && r.dataset.state;")

        def press(action: str, label: str | None = None) -> bool:
            return d.execute_script("const b = document.querySelector("
                                    "'tr[data-model=od-smol] button.' + arguments[0]);"
                                    "if (!b || b.disabled || arguments[1] && b.textContent !== "
                                    "arguments[1]) return false; b.click(); return true;",
                                    action, label)

        until(d, lambda: state() == "unloaded", "the declared model, unloaded", 60)
        until(d, lambda: press("load"), "the load button", 30)
        until(d, lambda: state() == "loaded", "the model loaded from the page", 120)
        assert httpx.post(api + "/v1/chat/completions", json={
            "model": "od-smol", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60).status_code == 200
        admin = {"Authorization": "Bearer adm-web"}
        listing = httpx.get(host + "/admin/models", headers=admin, timeout=10).json()
        held = listing["models"][0]["estimate_bytes"]
        assert held > 0 and listing["budget_bytes"] > held

        def memory() -> tuple[str, str, str] | None:  # the host's line: held, budget, text
            return d.execute_script("const p = document.querySelector('.host-memory');"
                                    "return p && [p.dataset.held, p.dataset.budget, p.textContent];")

        until(d, lambda: (memory() or [""])[0] == str(held), "the loaded model's memory held", 30)
        _, budget, text = memory()  # type: ignore[misc]
        assert budget == str(listing["budget_bytes"])
        assert f"{host}: " in text and f"{held / 1048576:.0f} MiB held of a " in text, text

        def pinned() -> list[str] | None:  # the row's pin, and its Pinned cell
            return d.execute_script("const r = document.querySelector("
                                    "'#ondemand-table tr[data-model=od-smol]');"
                                    "return r && [r.dataset.pin, r.cells[4].textContent];")

        def host_pin() -> bool:
            return httpx.get(host + "/admin/models", headers=admin).json()["models"][0]["pin"]

        assert pinned() == ["false", "no"]
        r = httpx.post(host + "/admin/pin", json={"model": "od-smol"})  # the host's admin key only
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
        until(d, lambda: press("pin", "pin"), "the pin button", 30)
        until(d, lambda: pinned() == ["true", "yes"], "the row to say pinned", 30)
        assert host_pin() is True
        d.execute_script("document.getElementById('ondemand-table').scrollIntoView();")
        shot(d, "console-ondemand.png")
        until(d, lambda: press("pin", "unpin"), "the unpin button", 30)
        until(d, lambda: pinned() == ["false", "no"], "the row to say not pinned", 30)
        assert host_pin() is False
        until(d, lambda: press("unload"), "the unload button", 30)
        until(d, lambda: state() == "unloaded", "the model unloaded from the page", 120)
    finally:
        d.quit()
