"""`tinylora serve` end to end: a real uvicorn server on 127.0.0.1, the real openai client."""

import concurrent.futures
import json
import socket
import threading

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from serving import ServerThread  # noqa: E402
from waiting import HANG_GUARD_S, wait_until  # noqa: E402
from waiting import running as proc_running  # noqa: E402

from tinylora import AdapterConfig, attach, load_adapter, save_adapter  # noqa: E402
from tinylora.generation.engine import sample  # noqa: E402
from tinylora.serve import Limits, build_server  # noqa: E402
from tinylora.serve.app import create_app  # noqa: E402
from tinylora.testing import tiny_model_and_tokenizer  # noqa: E402

BASE = "tiny-base"
KEY = "sk-test"
CONFIGS = [AdapterConfig(u=2, n_tie=4), AdapterConfig(u=1, n_tie=3), AdapterConfig(u=3, n_tie=1, seed=7),
           AdapterConfig(method="lora-xs", n_tie=2)]
PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44 t45 t46", "t50", "t60 t61", "1 + 2 ="]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}t99 {% endif %}")


def post(url, **kwargs):
    """httpx.post without its 5 s read timeout (the machine's speed must not decide a test)."""
    return httpx.post(url, timeout=HANG_GUARD_S, **kwargs)


def model_and_tokenizer():
    model, tok = tiny_model_and_tokenizer("llama")
    tok.chat_template = TEMPLATE
    return model, tok


def make_adapters(folder, n=16):
    folder.mkdir(exist_ok=True)
    paths = []
    for k in range(n):
        model, _ = model_and_tokenizer()
        ad = attach(model, CONFIGS[k % len(CONFIGS)], progress=False)
        with torch.no_grad():
            ad.v.copy_(torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(k)) * 2.0)
        paths.append(save_adapter(ad, folder / f"user{k}.safetensors"))
    return paths


def alone(path, prompt, max_tokens):
    """The greedy completion of one adapter on its own, loaded the plain way."""
    model, tok = model_and_tokenizer()
    if path is not None:
        load_adapter(model, path)
    return sample(model, tok, [prompt], max_new_tokens=max_tokens, greedy=True).completions[0]


class Running(ServerThread):
    """A real server in a thread."""

    def __init__(self, folder, **kwargs):
        model, tok = model_and_tokenizer()
        limits = kwargs.pop("limits", Limits(max_batch=8))
        super().__init__(build_server(model, tok, name=BASE, adapters=folder, limits=limits, **kwargs))

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    paths = make_adapters(folder)
    with Running(folder, api_key=KEY, allow_runtime_adapters=True) as running:
        running.paths = paths
        yield running


def test_models_lists_the_base_and_every_adapter(served):
    ids = [m.id for m in served.client().models.list()]
    assert ids == [BASE] + sorted(f"user{k}" for k in range(16))


def test_completion_chat_and_stream_match_the_adapter_alone(served):
    c = served.client()
    for k, prompt in [(0, PROMPTS[0]), (3, PROMPTS[2]), (None, PROMPTS[1])]:
        model = BASE if k is None else f"user{k}"
        out = c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == alone(None if k is None else served.paths[k], prompt, 10)
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True))
        assert streamed == out.choices[0].text
    chat = c.chat.completions.create(model="user1", messages=[{"role": "user", "content": "t30 t31"}],
                                     max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == alone(served.paths[1], "user t30 t31 t99 ", 8)
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="user1", messages=[{"role": "user", "content": "t30 t31"}], max_tokens=8, temperature=0, stream=True)]
    assert "".join(parts) == chat.choices[0].message.content


def test_sixteen_concurrent_clients_with_distinct_adapters_each_get_their_own(served):
    expected = {k: alone(served.paths[k], PROMPTS[k % len(PROMPTS)], 12) for k in range(16)}

    def one(k):
        out = served.client().completions.create(model=f"user{k}", prompt=PROMPTS[k % len(PROMPTS)], max_tokens=12,
                                                 temperature=0)
        return k, out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = dict(pool.map(one, range(16)))
    assert got == expected
    assert len(set(expected.values())) > 8  # the adapters really differ


def test_inline_adapter_equals_the_same_adapter_loaded(served):
    from tinylora.io import read_adapter_file
    config, _, tensors = read_adapter_file(served.paths[2])
    inline = {"config": json.loads(config.to_json()), "v": tensors["v"].tolist()}
    c = served.client()
    a = c.completions.create(model=BASE, prompt=PROMPTS[3], max_tokens=10, temperature=0,
                             extra_body={"adapter": inline})
    b = c.completions.create(model="user2", prompt=PROMPTS[3], max_tokens=10, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_seeded_sampling_n_and_stop(served):
    c = served.client()
    kw = dict(model="user5", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=7, n=3)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 3
    full = c.completions.create(model="user0", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3
    cut = c.completions.create(model="user0", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[words[2]])
    assert cut.choices[0].text == full[:full.index(words[2])] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="user0", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[words[2]], stream=True))
    assert streamed == cut.choices[0].text  # the held-back tail never leaks the stop string
    chunks = list(c.completions.create(model="user0", prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert 1 <= chunks[-1].usage.completion_tokens <= 5
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3
    eos_id = served.server.tokenizer.eos_token_id  # ignore_eos: exactly max_tokens tokens, EOS or not
    long = c.completions.create(model=BASE, prompt=[eos_id], max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 30 and long.choices[0].finish_reason == "length"


def test_bad_requests_get_openai_errors_and_do_not_disturb_others(served):
    c = served.client()
    cases = [
        (dict(model="nobody", prompt="t20"), openai.NotFoundError, "does not exist"),
        (dict(model=BASE, prompt="t20", temperature=5), openai.BadRequestError, "temperature"),
        (dict(model=BASE, prompt="t20", max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(model=BASE, prompt="t20", max_tokens=5000), openai.BadRequestError, "limit"),
        (dict(model=BASE, prompt="t20 " * 200), openai.BadRequestError, "tokens"),
        (dict(model=BASE, prompt="t20", n=99), openai.BadRequestError, "n=99"),
        (dict(model=BASE, prompt="t20", logprobs=2, stream=True), openai.BadRequestError, "not supported"),
        (dict(model=BASE, prompt="t20", logprobs=6), openai.BadRequestError, "logprobs"),
        (dict(model="", prompt="t20"), openai.BadRequestError, "model"),
        (dict(model=BASE, prompt="t20", stop=[f"s{i}" for i in range(17)]), openai.BadRequestError, "stop"),
        (dict(model=BASE, prompt=[999999]), openai.BadRequestError, "token ids"),
        (dict(model=BASE, prompt="t20", extra_body={"adapter": {"config": {"u": 1}, "v": [[1.0, 2.0]]}}),
         openai.BadRequestError, "shape"),
        (dict(model=BASE, prompt="t20", extra_body={"adapter": {"config": {"r": 3}, "v": [[1.0]]}}),
         openai.BadRequestError, "r=3"),
        (dict(model=BASE, prompt="t20", extra_body={"adapter": {"config": {"bogus": 1}, "v": [[1.0]]}}),
         openai.BadRequestError, "bogus"),
        (dict(model="user1", prompt="t20", extra_body={"adapter": {"v": [[1.0]]}}), openai.BadRequestError, "base"),
        (dict(model=BASE, prompt="t20",
              extra_body={"adapter": {"config": {"u": 10 ** 9, "n_tie": "all"}, "v": [[1.0]]}}),
         openai.BadRequestError, "shape"),  # refused before P (u × r × r per module) is built
        (dict(model=BASE, prompt="t20", extra_body={"adapter": {"config": {"n_tie": "all"}, "v": [[1e30]]}}),
         openai.BadRequestError, "refused"),
    ]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a neighbour generating throughout
        neighbour = pool.submit(lambda: c.completions.create(model="user4", prompt=PROMPTS[4], max_tokens=40,
                                                             temperature=0).choices[0].text)
        for kwargs, error, words in cases:
            with pytest.raises(error, match=words):
                c.completions.create(**kwargs)
        assert neighbour.result() == alone(served.paths[4], PROMPTS[4], 40)
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    raw = post(served.url + "/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "error" in raw.json()
    big = post(served.url + "/completions", json={"model": BASE, "prompt": "t20 " * 300_000},
               headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and big.json()["error"]["message"]


def test_logprobs_and_echo_through_the_openai_client(served):
    """The openai client parses the legacy logprobs object; the numbers: tests/test_serve_logprobs.py."""
    c = served.client()
    ids = served.server.tokenizer(PROMPTS[2]).input_ids
    out = c.completions.create(model="user3", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == PROMPTS[2] and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    more = c.completions.create(model="user3", prompt=PROMPTS[2], max_tokens=4, temperature=0, echo=True, logprobs=0,
                                stop=["t999"] * 16)  # up to 16 stop strings (evaluation harnesses send more than 4)
    assert more.choices[0].logprobs.token_logprobs[0] is None  # a longer forward: equal up to rounding
    assert more.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert len(more.choices[0].logprobs.tokens) == len(ids) + more.usage.completion_tokens
    assert more.choices[0].text.startswith(PROMPTS[2])


def test_a_client_that_leaves_mid_stream_frees_its_rows(served):
    with httpx.stream("POST", served.url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "user3", "prompt": PROMPTS[2], "max_tokens": 100, "stream": True,
                            "ignore_eos": True}, timeout=HANG_GUARD_S) as r:
        next(r.iter_lines())  # the first chunk arrives, then the client hangs up
    worker = served.server.worker
    wait_until(lambda: worker.rows == 0, lambda: worker.alive, "the rows of the client that left were freed",
               lambda: f"({worker.rows} rows left)")


def test_runtime_load_and_unload(served, tmp_path):
    extra = make_adapters(tmp_path / "more", n=1)[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    r = post(served.url + "/load_lora_adapter", json={"lora_name": "late", "lora_path": str(extra)}, headers=auth)
    assert r.status_code == 200, r.text
    c = served.client()
    assert "late" in [m.id for m in c.models.list()]
    assert c.completions.create(model="late", prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text == \
        alone(extra, PROMPTS[1], 6)
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(extra.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in v
    damaged.write_bytes(bytes(data))
    r = post(served.url + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(damaged)},
             headers=auth)
    assert r.status_code == 400 and "checksum" in r.json()["error"]["message"]
    flat = {"config": {"u": 1, "n_tie": "all"}, "v": [0.5]}  # inline, v given flat
    r = post(served.url + "/load_lora_adapter", json={"lora_name": "flat", "adapter": flat}, headers=auth)
    assert r.status_code == 200, r.text
    assert c.completions.create(model="flat", prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text == \
        c.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                             extra_body={"adapter": flat}).choices[0].text
    assert post(served.url + "/unload_lora_adapter", json={"lora_name": "late"}, headers=auth).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="late", prompt="t20", max_tokens=2)


def test_runtime_loading_is_off_by_default_and_a_full_queue_answers_429(tmp_path):
    make_adapters(tmp_path / "a", n=2)
    with Running(tmp_path / "a", limits=Limits(max_batch=2, max_queue=4)) as running:
        r = post(running.url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"})
        assert r.status_code == 403
        c = running.client(key="anything")  # no --api-key: any key is fine

        def one(i):
            try:
                out = c.completions.create(model="user1", prompt=PROMPTS[i % 6], max_tokens=60, temperature=0)
                return "ok", i, out.choices[0].text
            except openai.RateLimitError:
                return "429", i, None

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        assert {s for s, _, _ in results} == {"ok", "429"}
        for status, i, text in results:
            if status == "ok":
                assert text == alone(tmp_path / "a" / "user1.safetensors", PROMPTS[i % 6], 60)


def test_bounded_load_nothing_lost_or_mixed(served):
    """64 requests (4 per client, 16 clients, mixed adapters and the base): each answered with its own text."""
    jobs = [(i, None if i % 5 == 0 else i % 16, PROMPTS[i % 6], 4 + i % 9) for i in range(64)]
    expected = {i: alone(None if k is None else served.paths[k], p, m) for i, k, p, m in jobs}

    def one(job):
        i, k, p, m = job
        out = served.client().completions.create(model=BASE if k is None else f"user{k}", prompt=p, max_tokens=m,
                                                 temperature=0)
        return i, out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = dict(pool.map(one, jobs, timeout=HANG_GUARD_S))
    assert got == expected


def test_shutdown_finishes_requests_in_flight(tmp_path):
    make_adapters(tmp_path / "a", n=1)
    running = Running(tmp_path / "a").__enter__()
    c = running.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: c.completions.create(model="user0", prompt=PROMPTS[0], max_tokens=100,
                                                           temperature=0))
        worker = running.server.worker
        # the request is in flight (submitted, not finished) when the shutdown starts
        wait_until(lambda: worker.rows > 0, lambda: worker.alive and not pending.done(), "the request is in flight",
                   lambda: pending.exception() if pending.done() else "", poll_s=0.005)
        running.__exit__()
        out = pending.result(timeout=HANG_GUARD_S)
    assert out.choices[0].text == alone(tmp_path / "a" / "user0.safetensors", PROMPTS[0], 100)
    assert not running.thread.is_alive() and not running.server.worker.thread.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
def test_gpu_server_answers_concurrent_clients_with_their_own_adapters(tmp_path):
    paths = make_adapters(tmp_path / "a", n=8)
    model, tok = model_and_tokenizer()
    model = model.to("cuda")  # fp32: greedy tokens must equal each adapter alone on the same GPU
    running = Running.__new__(Running)
    running.server = build_server(model, tok, name=BASE, adapters=tmp_path / "a", limits=Limits(max_batch=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        running.port = s.getsockname()[1]
    running.uv = uvicorn.Server(uvicorn.Config(create_app(running.server), host="127.0.0.1", port=running.port,
                                               log_level="warning"))
    running.thread = threading.Thread(target=running.uv.run, daemon=True)
    running.url = f"http://127.0.0.1:{running.port}/v1"

    def alone_gpu(path, prompt, n):
        m, t = model_and_tokenizer()
        m = m.to("cuda")
        load_adapter(m, path)
        return sample(m, t, [prompt], max_new_tokens=n, greedy=True).completions[0]

    with running:
        def one(k):
            out = running.client().completions.create(model=f"user{k}", prompt=PROMPTS[k % 6], max_tokens=10,
                                                      temperature=0)
            return k, out.choices[0].text
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = dict(pool.map(one, range(8)))
    assert got == {k: alone_gpu(paths[k], PROMPTS[k % 6], 10) for k in range(8)}


def test_the_serve_command_end_to_end(tmp_path):
    """`tinylora serve` as users run it: a saved model folder, an adapters folder, SIGINT to stop."""
    import os
    import signal
    import subprocess
    import sys
    model, tok = model_and_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    paths = make_adapters(tmp_path / "adapters", n=2)
    lora = attach(model_and_tokenizer()[0], AdapterConfig(method="lora", r=1), progress=False)
    save_adapter(lora, tmp_path / "bad" / "lora.safetensors")
    cmd = [sys.executable, "-m", "tinylora", "serve", "--model", str(tmp_path / "base"), "--log-level", "warning"]
    env = {**os.environ, "TINYLORA_API_KEY": KEY}
    bad = subprocess.run(cmd + ["--adapters", str(tmp_path / "bad")], capture_output=True, text=True, env=env,
                         timeout=HANG_GUARD_S)
    assert bad.returncode == 2 and "lora.safetensors" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cmd + ["--adapters", str(tmp_path / "adapters"), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"

        def answers():
            try:
                return httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=HANG_GUARD_S).status_code == 200
            except httpx.HTTPError:  # not listening yet
                return False
        wait_until(answers, proc_running(proc), "the server came up",
                   lambda: proc.stdout.read() if proc.poll() is not None else "", poll_s=0.2)
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=HANG_GUARD_S)
        assert [m.id for m in c.models.list()] == [str(tmp_path / "base"), "user0", "user1"]
        out = c.completions.create(model="user1", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert out.choices[0].text == alone(paths[1], PROMPTS[0], 8)
        assert httpx.get(url + "/models", timeout=HANG_GUARD_S).status_code == 401  # the key from $TINYLORA_API_KEY
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=HANG_GUARD_S)[0]
    assert proc.returncode == 0 and "serving" in output and "2 adapters" in output
