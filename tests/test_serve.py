"""--mode serve: TensorFlow Serving's REST API, /classify, the page, batching, and bad requests."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ServeProcess, bomb_png, chromium, start_cli

# ---------------------------------------------------------------- --mode serve


@pytest.fixture(scope="module")
def served(trained):
    """``--mode serve`` on the trained model, on a free port, as a user starts it: ``(url, process)``."""
    work, _ = trained
    running = ServeProcess(start_cli("--mode", "serve", "--port", "0", "--max_body_mb", "1", "--request_timeout", "2", cwd=work))
    yield running.url, running
    if running.proc.poll() is None:
        running.proc.kill()


def _request(url: str, path: str, body: bytes | None = None, headers: dict | None = None, method=None):
    """``(status, JSON)`` of one request."""
    request = urllib.request.Request(url + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw_request(url: str, raw: bytes) -> tuple[int, dict]:
    """Send ``raw`` bytes as they are (a request a normal client would not send); ``(status, JSON)``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(raw)
        response = http.client.HTTPResponse(client)
        response.begin()
        return response.status, json.loads(response.read())


def test_serve_answers_tensorflow_serving_and_classify_requests(served, new_images):
    url, _ = served
    folder, truth = new_images
    images = sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))[:6]
    assert _request(url, "/healthz") == (200, {"status": "ok", "model": "cnn_model", "runtime": "litert"})
    assert _request(url, "/v1/models/cnn_model")[1]["model_version_status"][0]["state"] == "AVAILABLE"

    instances = [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in images]
    status, answer = _request(url, "/v1/models/cnn_model:predict", json.dumps({"instances": instances}).encode())
    assert status == 200 and len(answer["predictions"]) == len(images)
    classes = [row["classes"] for row in answer["predictions"]]
    assert np.mean([c == truth[p.name] for c, p in zip(classes, images)]) >= 0.8
    assert all(abs(sum(row["probabilities"]) - 1) < 1e-3 for row in answer["predictions"])
    columnar = {"inputs": {"image_bytes": instances[:2]}}
    status, answer = _request(url, "/v1/models/cnn_model:predict", json.dumps(columnar).encode())
    assert status == 200 and answer["outputs"]["classes"] == classes[:2]

    raw = _request(url, "/classify", images[0].read_bytes(), {"Content-Type": "image/png"})
    assert raw[0] == 200 and raw[1]["class"] == classes[0] and raw[1]["runtime"] == "litert"
    boundary = "simplecnnboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{images[0].name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + images[0].read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    multipart = _request(url, "/classify", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert multipart == (200, raw[1] | {"image": images[0].name})


def test_serve_answers_concurrent_requests_each_with_its_own_image(served, new_images):
    """Concurrent requests are batched into shared interpreter calls: each must still get its own answer."""
    url, _ = served
    folder, _ = new_images
    images = sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))[:12]
    alone = [_request(url, "/classify", p.read_bytes())[1]["top_k"] for p in images]
    answers = [None] * (3 * len(images))

    def ask(i):
        body = json.dumps({"instances": [{"b64": base64.b64encode(images[i % len(images)].read_bytes()).decode()}]})
        answers[i] = _request(url, "/v1/models/cnn_model:predict", body.encode())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, answer) in enumerate(answers):
        expected = alone[i % len(images)]
        probabilities = answer["predictions"][0]["probabilities"]
        assert status == 200 and answer["predictions"][0]["classes"] == expected[0]["class"]
        assert max(probabilities) == pytest.approx(expected[0]["probability"], abs=1e-4)


def test_batcher_runs_waiting_callers_in_one_call_and_answers_each():
    """While a call runs, callers queue; the next call takes them all and each gets its own rows."""
    from simple_cnn.serve import Batcher

    started, release = threading.Event(), threading.Event()
    sizes = []

    def predict(x):
        sizes.append(len(x))
        if len(sizes) == 1:  # hold the first call until every other caller waits
            started.set()
            assert release.wait(10)
        return x * 10.0

    batcher = Batcher(predict, max_images=8)
    results, errors = {}, []

    def call(i, n):
        try:
            results[i] = batcher(np.full((n, 2), i, np.float32))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    first = threading.Thread(target=call, args=(0, 1))
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=call, args=(i, 1 + i % 3)) for i in range(1, 7)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while len(batcher._waiting) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert errors == []
    for i in range(7):  # each caller got its own rows, as many as it sent
        assert results[i].shape == ((1 + i % 3) if i else 1, 2) and (results[i] == 10.0 * i).all()
    # 1 image, then the 12 waiting images in batches of at most 8, oldest first
    assert sizes[0] == 1 and sum(sizes[1:]) == 12 and max(sizes) <= 8 and len(sizes) == 3, sizes


def test_served_keras_model_batches_concurrent_requests_and_answers_each(trained, new_images, tmp_path):
    """Without a LiteRT copy, serve batches concurrent requests through Keras: same answers as one by one."""
    from simple_cnn.config import ClassifyConfig
    from simple_cnn.serve import ServedModel

    work, _ = trained
    shutil.copy(work / "models" / "cnn_model.keras", tmp_path / "alone.keras")  # no .tflite beside it
    model = ServedModel(tmp_path / "alone.keras", ClassifyConfig())
    assert model.predictor.runtime == "keras"
    images = [p.read_bytes() for p in sorted(new_images[0].rglob("*.png")) if not p.name.startswith(".")][:8]
    one_by_one = [model.probabilities([content])[0] for content in images]
    calls_before, together = model.batcher.calls, [None] * 24

    def ask(i):
        together[i] = model.probabilities([images[i % len(images)]])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(together))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, got in enumerate(together):
        np.testing.assert_allclose(got, one_by_one[i % len(images)], atol=1e-4)
    assert model.batcher.calls - calls_before < len(together)  # some requests shared a call


def test_batcher_gives_each_caller_of_a_failed_call_the_error_and_goes_on():
    from simple_cnn.serve import Batcher

    def predict(x):
        if (x < 0).any():
            raise RuntimeError("the interpreter failed")
        if (x > 100).any():
            raise KeyboardInterrupt  # not an Exception: the lead must still pass on
        return x

    batcher = Batcher(predict)
    with pytest.raises(RuntimeError, match="interpreter failed"):
        batcher(np.array([[-1.0]]))
    assert batcher(np.array([[2.0]])).tolist() == [[2.0]] and not batcher._busy
    with pytest.raises(KeyboardInterrupt):
        batcher(np.array([[101.0]]))
    after = []  # in a thread: a lead left stuck would make this call wait for ever
    caller = threading.Thread(target=lambda: after.append(batcher(np.array([[3.0]]))), daemon=True)
    caller.start()
    caller.join(10)
    assert [a.tolist() for a in after] == [[[3.0]]] and not batcher._busy


BAD_REQUESTS = [
    ("/classify", b"this is text, not an image", 400, "not an image"),
    ("/classify", b"\x89PNG\r\n\x1a\n" + b"\0" * 30, 400, "cannot read"),
    ("/classify", bomb_png(50_000, 50_000), 400, "pixels"),
    ("/classify", b"", 400, "empty"),
    ("/v1/models/cnn_model:predict", b"{not json", 400, "not JSON"),
    ("/v1/models/cnn_model:predict", b'{"instances": "x"}', 400, "instances"),
    ("/v1/models/cnn_model:predict", b'{"instances": [{"b64": "%%%"}]}', 400, "base64"),
    ("/v1/models/cnn_model:predict", b'{"instances": [{"image": 1}]}', 400, "instance 0"),
    ("/v1/models/other:predict", b'{"instances": []}', 404, "Servable not found"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_REQUESTS, ids=[f"{b[0]}-{b[3]}" for b in BAD_REQUESTS])
def test_serve_bad_requests_get_a_json_error_and_the_server_stays_up(served, path, body, status, words):
    url, running = served
    proc = running.proc
    got, answer = _request(url, path, body, {"Content-Type": "application/octet-stream"}, method="POST")
    assert (got, words in answer["error"]) == (status, True), answer
    assert _request(url, "/healthz")[0] == 200 and proc.poll() is None


def test_serve_truncated_image_too_large_body_and_wrong_method(served, new_images):
    url, _ = served
    folder, _ = new_images
    whole = (folder / "circle_0.png").read_bytes()
    assert _request(url, "/classify", whole[: len(whole) // 2])[0] == 400
    assert _request(url, "/classify")[0] == 405  # GET
    host, port = url.removeprefix("http://").split(":")
    too_large = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"  # refused unread
    status, answer = _raw_request(url, too_large)
    assert status == 413 and "larger than 1,048,576 bytes" in answer["error"]


def test_serve_slow_client_gets_408_and_many_requests_keep_it_up(served):
    url, running = served
    proc = running.proc
    host, port = url.removeprefix("http://").split(":")
    slow = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\xff" * 10  # the rest never comes
    status, answer = _raw_request(url, slow)
    assert status == 408 and "--request_timeout" in answer["error"]
    for _ in range(1000):
        assert _request(url, "/healthz")[0] == 200
    assert proc.poll() is None


def test_serve_page_classifies_an_uploaded_photo_in_a_browser(served, new_images):
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    folder, truth = new_images
    image = folder / "circle_0.png"
    with chromium() as browser:
        browser.get(url + "/")
        browser.find_element("id", "file").send_keys(str(image))
        WebDriverWait(browser, 30).until(lambda b: b.find_element("id", "answer").text not in ("", "Looking..."))
        answer = browser.find_element("id", "answer").text
        items = browser.find_elements("css selector", "#top li")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert answer.split(" (")[0] == truth[image.name] and len(items) == 3 and errors == [], (answer, errors)


def test_serve_stops_on_sigterm_after_the_request_in_flight(served, new_images):
    url, running = served
    proc = running.proc
    host, port = url.removeprefix("http://").split(":")
    folder, _ = new_images
    image = (folder / "circle_0.png").read_bytes()
    with socket.create_connection((host, int(port)), timeout=30) as client:
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: {len(image)}\r\nConnection: close\r\n\r\n"
        client.sendall(head.encode() + image[:100])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # while the request is in flight
        time.sleep(0.3)
        client.sendall(image[100:])
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert proc.wait(timeout=30) == 0
    log = running.log()
    assert "POST /classify 200" in log and "Stopped" in log and "Traceback" not in log
    assert base64.b64encode(image[:30]).decode()[:20] not in log  # requests are logged without their bytes
