"""The OpenAI-compatible HTTP API: a real `kairos serve --http-port` (tiny model, CPU) driven by
the official openai package, sync and async, and by raw HTTP for what that package would not
send."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import WORKER_ARGS, FakePrefillWorker, free_port, kairos_process

from kairos.engine import LLM, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.chat import ChatTemplate, ChatTemplateError
from kairos.transport.client import Client
from kairos.transport.serve import wait_until_healthy

MAX_PROMPT_CHARS = 4000


class Server:
    def __init__(self):
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc = kairos_process("serve", "--port", str(self.port), "--http-port", str(self.http_port),
                                   "--metrics-port", str(self.metrics_port), "--max-prompt-chars",
                                   str(MAX_PROMPT_CHARS), *WORKER_ARGS[2:])
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def counters(self) -> dict:
        with Client(self.addr, timeout_s=10) as client:
            return client.fresh_status()["counters"]

    def idle(self) -> dict:
        """The router's status once every worker holds no request and all its blocks are free."""
        with Client(self.addr, timeout_s=10) as client:
            return client.fresh_status(lambda status: all(
                w["free_blocks"] == w["total_blocks"] and not w["running"] and not w["waiting"]
                and not w.get("transfers") for w in status["workers"]), timeout_s=20)


def wait_healthy(url: str, proc: subprocess.Popen, output: list[str], timeout_s: float = 120.0) -> None:
    wait_until_healthy(url, timeout_s,
                       lambda: f"exited {proc.returncode}:\n{''.join(output)}" if proc.poll() is not None else None)


@pytest.fixture(scope="module")
def server(tiny_path):
    s = Server()
    try:
        wait_healthy(s.url, s.proc, s.output)
        yield s
    finally:
        s.proc.terminate()
        try:
            s.proc.wait(20)
        except subprocess.TimeoutExpired:
            s.proc.kill()


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny", num_kv_blocks=256, max_model_len=512)


def kairos_generate(prompt: str, max_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "kairos.cli", "generate", "--json", "--temperature", "0",
                          "--max-tokens", str(max_tokens), "--prompt", prompt], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_completions_equal_kairos_generate_streamed_or_not(server):
    prompt = "The quick brown fox"
    want = kairos_generate(prompt, 24)
    client = server.openai()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want["text"]
    assert got.choices[0].finish_reason == want["finish_reason"]
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["token_ids"])

    # Token ids and several prompts in one request: one choice each, in order.
    several = client.completions.create(model="tiny", prompt=[want["prompt_token_ids"], [5, 6, 7]], max_tokens=24,
                                        temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == want["text"]


def test_chat_renders_the_model_template_and_streams(server, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]
    rendered = ChatTemplate.for_model("tiny").render(messages)
    ids = offline.tokenizer.encode(rendered, add_special_tokens=False)
    assert ids.count(0) == 1  # the template's BOS, not a second one from the tokenizer
    want = offline.generate([ids], SamplingParams(max_tokens=20, temperature=0))[0]
    client = server.openai()
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(want.token_ids)

    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    assert stream[-1].choices[0].finish_reason == want.finish_reason

    # Content given as text parts reads as the same conversation.
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=20,
                                          temperature=0).choices[0].message.content == want.text


def test_stop_strings_cut_the_text(server):
    client = server.openai()
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(full[i:i + 3] for i in range(8, len(full) - 3) if full[i:i + 3].strip())
    got = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=40, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert got.text == full[:full.index(stop)]
    assert got.finish_reason == "stop"


def test_the_async_client_streams_many_requests_at_once(server, offline):
    prompts = [f"Request number {i} says" for i in range(8)]
    want = [o.text for o in offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(prompt: str) -> str:
            stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                     stream=True)
            return "".join([c.choices[0].text async for c in stream])

        streamed = await asyncio.gather(*(one(prompt) for prompt in prompts))
        whole = await client.completions.create(model="tiny", prompt=prompts[0], max_tokens=12, temperature=0)
        await client.close()
        return streamed, whole.choices[0].text

    streamed, whole = asyncio.run(main())
    assert streamed == want and whole == want[0]


def test_slos_in_the_body_reach_the_router_and_its_status(server):
    client = server.openai()
    before = server.counters()
    client.completions.create(model="tiny", prompt="hurry", max_tokens=3, temperature=0,
                              extra_body={"ttft_slo_ms": 0.001, "tpot_slo_ms": 1e6, "output_len_hint": 3})
    after_impossible = server.counters()
    client.completions.create(model="tiny", prompt="no hurry", max_tokens=3, temperature=0,
                              extra_body={"ttft_slo_ms": 1e6, "tpot_slo_ms": 1e6, "kind": "throughput",
                                          "deadline_ms": 60_000})
    status = json.loads(subprocess.run([sys.executable, "-m", "kairos.cli", "status", "--json", "--addr",
                                        server.addr], capture_output=True, text=True, check=True).stdout)
    after_easy = status["counters"]
    assert after_impossible["completed"] == before["completed"] + 1
    assert after_impossible["ttft_met"] == before["ttft_met"]  # a microsecond TTFT is missed
    assert after_impossible["tpot_met"] == before["tpot_met"] + 1
    assert after_easy["ttft_met"] == after_impossible["ttft_met"] + 1
    # The throughput request is judged by its deadline too.
    assert after_easy["deadline_met"] == after_impossible["deadline_met"] + 1
    assert after_easy["slo_met"] == after_impossible["slo_met"] + 1


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=60, **kwargs)


BAD_REQUESTS = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": [3] * 600}, 400, None),  # beyond --max-model-len 512
    ("/v1/completions", {"model": "tiny", "prompt": [3] * 500, "max_tokens": 13}, 400, None),  # 513 > 512
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 512}, 400, None),
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 0}, 400, "logprobs"),  # 0 asks for some
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"42": -100}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "logit_bias": {"42": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "ttft_slo_ms": -5}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "kind": "collective", "deadline_ms": 5000}, 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "no role"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "bogus", "content": "x"}]}, 400,
     "messages[0].role"),
    # Valid JSON, but not valid Unicode: the first prompt is not sent without the second.
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "a\\ud800"]}', 400, None),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    # Under the body limit, over what one message to the router may carry.
    ("/v1/completions", {"model": "tiny", "prompt": "x" * (17 * 2**20)}, 413, None),
]


def test_bad_input_gets_the_right_status_in_the_openai_shape_and_serving_goes_on(server):
    metrics_before = scrape(f"{server.url}/metrics")
    for path, body, status, param in BAD_REQUESTS:
        for stream in (False, True):
            if stream and isinstance(body, dict):
                if "stream_options" in body:
                    continue  # its fault is being sent without stream
                body = {**body, "stream": True}
            response = post(server, path, body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            assert error["param"] == param, (body, error)
    too_big = post(server, "/v1/completions", b" " * (33 * 2**20))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    # The official client raises its own error types on them.
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    # Over-long prompts (router and worker limits, each streamed and not) were counted as such.
    after = scrape(f"{server.url}/metrics")
    assert value(after, "kairos:request_failure_total", code="prompt_too_long") - value(
        metrics_before, "kairos:request_failure_total", code="prompt_too_long") == 8
    assert client.completions.create(model="tiny", prompt="still serving", max_tokens=4).usage.completion_tokens == 4
    server.idle()


def test_a_max_tokens_given_must_fit_beside_the_prompt_and_one_not_given_ends_at_the_model_length(server):
    """As OpenAI's and vLLM's APIs: a max_tokens the model's length leaves no room for is a 400
    naming what fits; without one, the output ends at the model's length."""
    client = server.openai()
    prompt = [3] * 500  # of --max-model-len 512
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=13, extra_body={"ignore_eos": True})
    assert refused.value.body["code"] == "context_length_exceeded"
    assert "at most 12 output tokens fit" in refused.value.body["message"]
    fits = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True})
    assert fits.usage.completion_tokens == 12
    default = client.completions.create(model="tiny", prompt=prompt, extra_body={"ignore_eos": True})  # 16
    assert default.choices[0].finish_reason == "length" and default.usage.completion_tokens == 12
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 240}],
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 512


def test_null_means_the_default_and_n_gives_that_many_choices(server):
    """Clients send null for optional fields they leave unset; n copies a prompt (seeded copies
    differ and repeat), streamed or not, every chunk of a stream with the same `created`."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": None,
            "top_p": None, "top_k": None, "n": None, "stream": None, "presence_penalty": None,
            "frequency_penalty": None, "logprobs": None, "ignore_eos": None, "stream_options": None,
            "logit_bias": {}, "user": "u1"}  # an empty bias and a user id change nothing
    response = post(server, "/v1/chat/completions", chat)
    assert response.status_code == 200, response.text
    client = server.openai()
    greedy = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=5, temperature=0, n=2)
    texts = [c.text for c in sorted(greedy.choices, key=lambda c: c.index)]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3] and greedy.usage.completion_tokens == 20
    # Each prompt's tokens count once, however many copies of it ran (as OpenAI and vLLM count).
    single = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=1, temperature=0)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens > 0
    seeded = [client.completions.create(model="tiny", prompt="a", max_tokens=8, temperature=1.0, seed=3, n=3,
                                        extra_body={"ignore_eos": True}) for _ in range(2)]
    runs = [[c.text for c in sorted(r.choices, key=lambda c: c.index)] for r in seeded]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, n=2, stream=True, temperature=0,
                                                 stream_options={"include_usage": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1} and len({c.created for c in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 8
    alone = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert chunks[-1].usage.prompt_tokens == alone.usage.prompt_tokens


def test_a_timeout_tells_openai_clients_not_to_retry():
    from kairos.transport.http_api import APIError

    response = APIError(504, "the request timed out").response()
    assert response.status_code == 504 and response.headers["x-should-retry"] == "false"
    assert "x-should-retry" not in APIError(503, "no worker").response().headers


def test_a_client_that_disconnects_aborts_its_request_and_blocks_return(server):
    before = server.counters()
    logged = len(server.output)
    metrics_before = scrape(f"{server.url}/metrics")
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert [next(lines) for _ in range(4)][0].startswith("data: ")
        # Mid-stream, the connection closed; now one that is not streamed, given up on well
        # before its 480 tokens (about half a second here) are out.
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{server.url}/v1/completions", json=body, timeout=0.1)
    status = server.idle()
    assert status["counters"]["aborted"] == before["aborted"] + 2
    assert status["counters"]["completed"] == before["completed"]
    # The one not streamed is answered 499 (to no one; the stream had its 200), and nothing is
    # logged as a failure of the server.
    gone = value(scrape(f"{server.url}/metrics"), "kairos:http_requests_total", endpoint="/v1/completions",
                 status="499") - value(metrics_before, "kairos:http_requests_total", endpoint="/v1/completions",
                                       status="499")
    assert gone == 1
    assert not any("Traceback" in line or "Exception" in line for line in server.output[logged:])


def scrape(url: str) -> dict:
    """{(name, labels): value} of every sample at url."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_sent(server):
    api_url, router_url = f"{server.url}/metrics", f"http://127.0.0.1:{server.metrics_port}/metrics"
    server.idle()
    before = scrape(api_url)
    client = server.openai()
    for i in range(3):
        client.completions.create(model="tiny", prompt=f"count me {i}", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    with Client(server.addr) as native:
        workers = native.fresh_status()["workers"]
    after, router = scrape(api_url), scrape(router_url)
    for samples in (after, router):
        def delta(name, **labels):
            return value(samples, name, **labels) - value(before, name, **labels)

        assert delta("kairos:request_received_total") == 3
        assert delta("kairos:request_success_total", finished_reason="length") == 3
        assert delta("kairos:request_generation_tokens_sum") == 15
        assert delta("kairos:time_to_first_token_seconds_count") == 3
        assert delta("kairos:time_per_output_token_seconds_count") == 3
        assert delta("kairos:e2e_request_latency_seconds_count") == 3
        for w in workers:
            labels = {"worker": w["worker_id"], "role": w["role"]}
            assert value(samples, "kairos:kv_blocks_total", **labels) == w["total_blocks"]
            assert value(samples, "kairos:kv_blocks_free", **labels) == w["free_blocks"]
        decode = next(w for w in workers if w["role"] == "decode")
        steps = value(samples, "kairos:step_duration_seconds_count", worker=decode["worker_id"], role="decode",
                      phase="decode")
        assert steps >= 12  # 4 decode steps of each request at least
        assert value(samples, "kairos:kv_transfers_total", worker=decode["worker_id"], role="decode") >= 3
    assert value(after, "kairos:http_requests_total", endpoint="/v1/completions", status="200") >= 3


def test_http_replay_reports_attainment_through_the_front_door(server):
    out = subprocess.run([sys.executable, "-m", "kairos.cli", "bench", "replay", "--http", server.url, "--limit", "8",
                          "--max-prompt-len", "64", "--max-output-len", "8", "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["requests"] == 8 and report["failed"] == 0
    assert report["ttft_ms"]["p50"] > 0


def test_no_worker_is_503_a_silent_one_504_and_the_key_is_checked(tiny_path):
    """Against a router with no workers, then with fake ones that never answer; the API is
    started with --timeout 1 and an API key, on any free port (--port 0), which it prints."""
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    router = kairos_process("router", "--port", str(port))
    api = kairos_process("api", "--router", addr, "--port", "0", "--timeout", "1", "--api-key", "s3cret")
    fakes = []
    try:
        url = next(re.search(r"at (http://\S+)/v1 ", line).group(1) for line in api.stdout if "serving" in line)
        assert not url.endswith(":0")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and api.poll() is None
                time.sleep(0.2)
        assert health.status_code == 503 and health.json()["error"]["code"] == "unavailable"
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as unavailable:
            client.completions.create(model="tiny", prompt="anyone?", max_tokens=2)
        assert unavailable.value.status_code == 503 and time.monotonic() - started < 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        fakes = [FakePrefillWorker(addr, {}, "fake-p"), FakePrefillWorker(addr, {}, "fake-d", role="decode")]
        wait_healthy(url, api, [])
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as timed_out:
            client.completions.create(model="tiny", prompt="never answered", max_tokens=2)
        assert timed_out.value.status_code == 504 and time.monotonic() - started < 10
        # The request was aborted where it waited.
        request = fakes[0].next_request()
        assert fakes[0].next_request(kind=p.Abort).request_id == request.request_id
    finally:
        for fake in fakes:
            fake.close()
        for proc in (api, router):
            proc.terminate()
            proc.wait(10)


def test_the_api_runs_without_torch():
    code = ("import sys; from kairos.cli.main import build_parser; build_parser(); "
            "from kairos.transport import http_api; from kairos.transport.chat import ChatTemplate; "
            "ChatTemplate.for_model('tiny'); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- chat templates, against transformers -----------------------------------------------------

# A template with a system turn, loop controls and a refusal, in the style of released models'.
TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}\
{% set messages = messages[1:] %}{% else %}{% set system = 'You help.' %}{% endif %}
<<{{ system | trim }}>>
{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('roles must alternate') }}{% endif %}
[{{ message['role'] | upper }}] {{ message['content'] }}\
{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Terse.  "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "ünïcode ✓"}],
]


# transformers' generation marks, a `tools` test without a `defined` guard, and an extra value
# a request gives (chat_template_kwargs).
MARKED_TEMPLATE = """{% for message in messages %}{% if message['role'] == 'assistant' %}\
{% generation %}<{{ message['content'] }}>{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}\
{% endfor %}{% if tools is not none %}[TOOLS]{% endif %}\
{% if enable_thinking is defined and not enable_thinking %}[NO THINKING]{% endif %}"""


@pytest.mark.parametrize("template", [None, TEMPLATE, MARKED_TEMPLATE], ids=["tiny", "custom", "marked"])
def test_chat_templates_render_as_transformers_does(tiny_path, tmp_path, template):
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((tiny_path / name).read_text())
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    reference = AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate.for_model(str(folder))
    for messages in CONVERSATIONS:
        for generation in (True, False):
            assert ours.render(messages, generation) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation)
            assert ours.render(messages, generation, enable_thinking=False) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation, enable_thinking=False)
    if template is TEMPLATE:
        with pytest.raises(ChatTemplateError, match="roles must alternate"):
            ours.render([{"role": "assistant", "content": "first"}])
    assert ChatTemplate.for_model("tiny").render(CONVERSATIONS[0]) == ChatTemplate.for_model(str(tiny_path)).render(
        CONVERSATIONS[0])


def test_a_model_without_a_template_has_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert ChatTemplate.for_model(str(tmp_path)) is None
