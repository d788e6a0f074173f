"""A text-conditional model over HTTP: the bundled LlamaGen t2i model (16x16 tokens, 64 px, MiniLM
captions) alone on a real server. Negative prompts on both routes and their errors, and the OpenAI
client's streamed partial images over token rows."""

import dataclasses

import numpy as np
import openai
import pytest

from models.settings import ImageSettings
from service.images import to_pil
from tests.service.harness import TIMEOUT_S, ThreadServer, bundled_model_config, decode_png, on_model_threads

MODEL = "llamagen-shapes-t2i"
PROMPT = "a red circle in the middle"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = bundled_model_config(MODEL, tmp_path_factory.mktemp("t2i"))
    with ThreadServer(config=config, max_batch_size=4, timeout_s=60) as s:
        yield s


def pixels(b64: str) -> bytes:
    return decode_png(b64).tobytes()


def test_a_negative_prompt_is_the_engines_on_both_routes(server):
    body = {"prompt": PROMPT, "seed": 5, "n": 2, "cfg_scale": 3.0, "negative_prompt": "a blue square"}
    native = server.post(body, path="/v1/generate")
    openai_shape = server.post(body)
    assert native.status_code == openai_shape.status_code == 200, native.text
    images = [d["b64_json"] for d in native.json()["data"]]
    assert images == [d["b64_json"] for d in openai_shape.json()["data"]]

    runner = server.runner(MODEL)
    top_k = runner.spec.defaults.top_k
    settings = [ImageSettings(seed=s, cfg=3.0, top_k=top_k, negative_prompt="a blue square") for s in (5, 6)]
    with on_model_threads(server):
        direct = to_pil(runner.generate([PROMPT] * 2, settings).images)
    assert [pixels(b) for b in images] == [p.tobytes() for p in direct]
    without = server.post({**body, "negative_prompt": None})
    assert [d["b64_json"] for d in without.json()["data"]] != images
    # guidance for the first 20 image tokens only: the engine's too
    interval = server.post({**body, "cfg_interval": 20})
    settings = [dataclasses.replace(s, cfg_interval=20) for s in settings]
    with on_model_threads(server):
        direct = to_pil(runner.generate([PROMPT] * 2, settings).images)
    assert [pixels(d["b64_json"]) for d in interval.json()["data"]] == [p.tobytes() for p in direct]
    assert [d["b64_json"] for d in interval.json()["data"]] != images


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"cfg_scale": 1.0}, "negative_prompt", "needs guidance, and this request has none (cfg_scale is 1)"),
        ({"negative_prompt": "   "}, "negative_prompt", "negative_prompt is empty"),
        (
            {"cfg_interval": 256},
            "cfg_interval",
            "cfg_interval is 256: give -1 (guide every token) or the last",
        ),
    ],
)
def test_guidance_errors_name_the_field(server, change, field, words):
    for path in ("/v1/images/generations", "/v1/generate"):
        r = server.post({"prompt": PROMPT, "negative_prompt": "a dog", **change}, path=path)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field and words in r.json()["error"]["message"]
    r = server.post({"prompt": PROMPT, "negative_prompt": "x" * 4001})
    assert r.status_code == 422 and r.json()["error"]["param"] == "negative_prompt"
    assert server.post({"prompt": PROMPT}).status_code == 200  # and it serves on


def test_openai_client_streams_partial_images_over_token_rows(server):
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0
    ) as client:
        kw = dict(model=MODEL, prompt=PROMPT, extra_body={"seed": 9, "negative_prompt": "a green star"})
        plain = client.images.generate(**kw)
        events = list(client.images.generate(stream=True, partial_images=2, **kw))
    assert [(e.type, getattr(e, "step", None)) for e in events] == [
        ("image_generation.partial_image", 5),
        ("image_generation.partial_image", 10),
        ("image_generation.completed", None),
    ]
    assert events[-1].b64_json == plain.data[0].b64_json
    # a preview after row 5: the 6 rows of 4 px generated so far, grey below them
    preview = np.asarray(decode_png(events[0].b64_json))
    assert preview.shape == (64, 64, 3)
    assert (preview[24:] == 128).all() and not (preview[:24] == 128).all()
    usage = events[-1].usage
    assert usage.input_tokens_details.text_tokens == usage.input_tokens > 0
    assert usage.output_tokens == 256
