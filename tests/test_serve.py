"""Tests of `lmforge serve`: `pytest tests/test_serve.py`.

A tiny random chat model saved as a model directory and loaded with `serve.load`, served by a
real uvicorn server on a free port of 127.0.0.1 in a background thread, queried with the real
`openai` client (replies checked against lmforge.engine and a plain forward pass) and with raw
httpx requests (SSE framing, malformed requests, the body limit, the lock).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn

from lmforge import cli, engine, serve
from lmforge.chat import check, prompt_ids
from lmforge.engine import DEFAULT_STOPS, generate
from lmforge.serve import Reply, create_app, load
from lmforge.tokenizer import TokenizerConfig, load_encoder, save, train
from lmforge.weights import save_model
from tests.forge.helpers import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "tiny-chat"
TEXT = ["The quick brown fox jumps over the lazy dog. Ünïcödé café, naïve 東京 and 🦊 foxes. "
        "What is 2 + 3? 5."] * 30
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
MAX = 36  # new tokens: the 25-token prompt + 36 fit the tiny model's context of 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    save(train(TEXT, TokenizerConfig(vocab_size=300)), root / "tokenizer")
    vocab = load_encoder(root / "tokenizer").n_vocab + 20  # a head wider than the tokenizer, as in training
    save_model(tiny(vocab, seed=8), root / "model", tokenizer_dir=root / "tokenizer")
    return root / "model"


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[SimpleNamespace]:
    model, encoder = load(model_dir)
    app = create_app(model, encoder, NAME)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as http:
        yield SimpleNamespace(url=url, app=app, http=http,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                                                   timeout=30))
    srv.should_exit = True
    thread.join(15)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> SimpleNamespace:
    """The same model, loaded apart from the server's, and the reference computations."""
    model, enc = load(model_dir)

    def prompt(messages: list[dict[str, str]] = MESSAGES) -> list[int]:
        return prompt_ids(enc, check(messages, "test", need_assistant=False))

    def greedy(max_tokens: int = MAX) -> list[int]:
        return generate(model, [prompt()], max_tokens, temperature=0, stop_tokens=DEFAULT_STOPS,
                        vocab_size=enc.n_vocab)[0]

    def mean_logprob(ids: list[int]) -> float:
        """A plain forward pass over prompt + reply: the raw log-softmax at each reply token."""
        p = prompt()
        with torch.no_grad():
            logp = model(torch.tensor([p + ids]))[0].double().log_softmax(-1)
        return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(ids)) / len(ids)

    return SimpleNamespace(enc=enc, prompt=prompt, greedy=greedy, mean_logprob=mean_logprob)


def create(server: SimpleNamespace, **kw: Any) -> Any:
    return server.client.chat.completions.create(model=NAME, messages=MESSAGES, **kw)


def streamed(server: SimpleNamespace, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(create(server, stream=True, stream_options={"include_usage": True}, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_greedy_reply_is_the_engines_with_usage_and_mean_logprob(server: SimpleNamespace,
                                                                  ref: SimpleNamespace) -> None:
    ids = ref.greedy()
    assert 10 <= len(ids) < MAX, "the tiny model should stop by itself; the test proves less otherwise"
    r = create(server, temperature=0, max_tokens=MAX)
    assert (r.object, r.model, r.id[:9]) == ("chat.completion", NAME, "chatcmpl-")
    [choice] = r.choices
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    assert choice.logprobs is None
    assert choice.message.content == ref.enc.decode(ids)
    assert "\ufffd" in choice.message.content  # a random model's byte tokens: broken UTF-8, as decode has it
    usage = r.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(ref.prompt()), len(ids), len(ref.prompt()) + len(ids))
    mean = usage.model_extra["mean_logprob"]
    assert math.isfinite(mean) and mean < 0
    assert mean == pytest.approx(ref.mean_logprob(ids), abs=1e-5)
    # the default max_tokens is the rest of the context, and `model` may name anything
    assert server.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0
                                                 ).choices[0].message.content == choice.message.content


def test_developer_role_text_parts_and_unknown_fields(server: SimpleNamespace, ref: SimpleNamespace) -> None:
    """`developer` is the system turn, text parts are the content, fields it does not know are ignored."""
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}], "name": "ann"}]
    r = server.http.post("/v1/chat/completions", json={
        "model": NAME, "messages": messages, "temperature": 0, "max_tokens": MAX, "user": "ann",
        "presence_penalty": 0.5, "metadata": {"k": "v"}, "stream_options": None, "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref.enc.decode(ref.greedy())


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.3, "top_p": 0.95, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_stream_equals_the_non_streaming_reply(server: SimpleNamespace, sampling: dict[str, Any]) -> None:
    whole = create(server, max_tokens=MAX, **sampling)
    text, chunks = streamed(server, max_tokens=MAX, **sampling)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert {c.model for c in chunks} == {NAME}
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [
        whole.choices[0].finish_reason]
    last = chunks[-1]  # the usage chunk: no choices
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.model_extra["mean_logprob"] == pytest.approx(whole.usage.model_extra["mean_logprob"])
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_without_usage(server: SimpleNamespace) -> None:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 6, "stream": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["choices"] and "usage" not in e for e in events)  # no usage chunk unless asked
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_max_tokens_ends_with_length(server: SimpleNamespace, ref: SimpleNamespace) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        r = create(server, temperature=0, **{field: 5})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        assert r.choices[0].message.content == ref.enc.decode(ref.greedy(5))
    text, chunks = streamed(server, temperature=0, max_tokens=5)
    assert text == ref.enc.decode(ref.greedy(5)) and chunks[-2].choices[0].finish_reason == "length"


def test_stop_strings_end_the_reply_before_them(server: SimpleNamespace, ref: SimpleNamespace) -> None:
    full = ref.enc.decode(ref.greedy())
    stop = next(full[i:i + 2] for i in range(3, len(full)) if "\ufffd" not in full[i:i + 2])
    expected = full[:full.index(stop)]
    for stops in (stop, [stop, "never in it"]):
        r = create(server, temperature=0, max_tokens=MAX, stop=stops)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
        assert r.usage.completion_tokens < len(ref.greedy())  # generation stopped there
        text, chunks = streamed(server, temperature=0, max_tokens=MAX, stop=stops)
        assert text == expected and chunks[-2].choices[0].finish_reason == "stop"


def test_reply_sends_whole_characters_and_holds_back_stop_prefixes() -> None:
    reply = Reply()
    fox, e = "🦊".encode(), "é".encode()
    assert [reply.add(b) for b in (b"a", fox[:1], fox[1:3], fox[3:] + e[:1], e[1:], b"\xff", b"z")] == [
        "a", "", "", "🦊", "é", "\ufffd", "z"]
    assert reply.add(b"\xe2\x82") == "" and reply.finish() == "\ufffd"  # cut off: as bytes.decode
    reply = Reply(["END", "xy"])
    assert [reply.add(b) for b in (b"hi E", b"N", b"d E", b"NEN", b"Dmore")] == ["hi ", "", "ENd ", "EN", ""]
    assert (reply.text, reply.stopped) == ("hi ENd EN", True)
    reply = Reply(["END"])
    assert reply.add(b"ok EN") == "ok " and reply.finish() == "EN" and not reply.stopped


def test_models_and_health(server: SimpleNamespace) -> None:
    assert [m.id for m in server.client.models.list()] == [NAME]
    assert server.client.models.retrieve(NAME).owned_by == "lmforge"
    assert server.http.get("/health").json() == {"status": "ok", "model": NAME}
    r = server.http.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


GOOD = {"messages": MESSAGES, "max_tokens": 2}
BAD = {
    "invalid_json": (b'{"messages": [', None, "not valid JSON"),
    "not_an_object": ([GOOD], None, "must be a JSON object"),
    "text_plain": (json.dumps(GOOD).encode(), None, "Content-Type: application/json"),
    "no_messages": ({"model": NAME}, "messages", "missing required parameter: 'messages'"),
    "empty_messages": ({"messages": []}, "messages", "non-empty list"),
    "messages_a_string": ({"messages": "hi"}, "messages", "valid list"),
    "bad_role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "unknown role 'wizard'"),
    "content_not_text": ({"messages": [{"role": "user", "content": 5}]}, "messages", "string 'role' and"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                   "messages", "not text"),
    "n_2": ({**GOOD, "n": 2}, "n", "n=2 is not supported"),
    "negative_temperature": ({**GOOD, "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    "temperature_a_string": ({**GOOD, "temperature": "hot"}, "temperature", "valid number"),
    "top_p_0": ({**GOOD, "top_p": 0}, "top_p", "greater than 0"),
    "max_tokens_0": ({**GOOD, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    "max_tokens_a_float": ({**GOOD, "max_tokens": 2.0}, "max_tokens", "valid integer"),
    "too_many_tokens": ({**GOOD, "max_tokens": 10_000}, "max_tokens", "max_tokens=10000 is too large"),
    "prompt_too_long": ({"messages": [{"role": "user", "content": "fox " * 80}]}, "messages", "no room"),
    "five_stops": ({**GOOD, "stop": list("abcde")}, "stop", "at most 4"),
    "stop_a_number": ({**GOOD, "stop": 3}, "stop", "valid string"),
    "logprobs": ({**GOOD, "logprobs": True}, "logprobs", "not supported"),
    "tools": ({**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calls"),
    "stream_a_string": ({**GOOD, "stream": "yes"}, "stream", "valid boolean"),
}


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_requests_get_a_400_and_the_server_goes_on(server: SimpleNamespace, case: str) -> None:
    body, param, message = BAD[case]
    headers = {"content-type": "text/plain" if case == "text_plain" else "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post("/v1/chat/completions", content=content, headers=headers)
    error = assert_error(r, 400, param)
    assert message in error["message"]
    r = server.http.post("/v1/chat/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_the_openai_client_raises_the_message(server: SimpleNamespace) -> None:
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported") as e:
        create(server, n=2)
    assert e.value.status_code == 400 and e.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="greater than or equal to 0"):
        create(server, temperature=-1, stream=True)


def test_unknown_routes_and_methods(server: SimpleNamespace) -> None:
    assert "Invalid URL (GET /v1/nope)" in assert_error(server.http.get("/v1/nope"), 404)["message"]
    assert_error(server.http.post("/v1/completions", json=GOOD), 404)
    assert_error(server.http.get("/v1/chat/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        server.client.embeddings.create(model=NAME, input="hi")


def test_bodies_over_a_megabyte_get_a_413(server: SimpleNamespace) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    assert assert_error(server.http.post("/v1/chat/completions", content=big,
                                         headers={"content-type": "application/json"}), 413)["code"] == (
        "request_too_large")
    chunked = server.http.post("/v1/chat/completions", content=iter([big[:1000], big[1000:]]),
                               headers={"content-type": "application/json"})
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert_error(chunked, 413)
    # a chunked body under the limit is read and handed on whole
    r = server.http.post("/v1/chat/completions", content=iter([json.dumps(GOOD).encode()]),
                         headers={"content-type": "application/json"})
    assert r.status_code == 200


def test_one_generation_at_a_time_and_the_loop_stays_free(server: SimpleNamespace, ref: SimpleNamespace,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    monkeypatch.setattr(serve, "steps", lambda *a, **kw: runs.append(1) or engine.steps(*a, **kw))
    results: list[Any] = []
    lock = server.app.state.lock
    with lock:
        def ask() -> None:
            results.append(create(server, temperature=0, max_tokens=MAX))

        workers = [threading.Thread(target=ask) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        assert not results  # waiting for the model
        t = time.monotonic()
        assert server.http.get("/health").status_code == 200 and time.monotonic() - t < 2
        # a stream that is left while it waits: its generation is skipped, the lock not kept
        with server.http.stream("POST", "/v1/chat/completions", json={**GOOD, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
        time.sleep(0.2)
    for w in workers:
        w.join(30)
    assert [r.choices[0].message.content for r in results] == [ref.enc.decode(ref.greedy())] * 2
    assert len(runs) == 2  # the stream's client had gone when its turn came
    assert create(server, temperature=0, max_tokens=3).usage.completion_tokens == 3


def test_cli_serve(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append({"app": app, **kw}))
    assert cli.main(["serve", "--model", str(model_dir), "--port", "8123"]) == 0
    out = capsys.readouterr()
    assert "model (" in out.out and "at http://127.0.0.1:8123/v1" in out.out and not out.err
    assert (ran[0]["host"], ran[0]["port"]) == ("127.0.0.1", 8123)
    assert cli.main(["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--name", "m"]) == 0
    out = capsys.readouterr()
    assert "m (" in out.out and "http://0.0.0.0:8000/v1" in out.out and "not a loopback address" in out.err
    app = ran[1]["app"]
    assert [r.path for r in app.routes if r.path.startswith("/v1")] == [
        "/v1/models", "/v1/models/{model_id}", "/v1/chat/completions"]
    assert cli.main(["serve", "--model", str(model_dir.parent)]) == 2  # not a model directory
    assert "lmforge: error:" in capsys.readouterr().err
