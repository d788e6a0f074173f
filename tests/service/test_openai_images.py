"""The OpenAI Images API as the official `openai` client sees it, against a real server with the
fixture VAR (10 scales, 680 tokens, 256 px): plain and streamed generations, partial images spread
over the scales, errors raised by the client, and the server serving on after them."""

import base64
import io

import openai
import pytest
from PIL import Image

from tests.service.harness import TIMEOUT_S, ThreadServer, decode_png

MODEL = "var-fixture"
IMAGE_TOKENS = sum(pn * pn for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


@pytest.fixture(scope="module")
def server():
    with ThreadServer(max_batch_size=4, max_queue_size=4, max_wait_ms=20, timeout_s=60) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0) as c:
        yield c


def streamed(client, **kw) -> tuple[list, list]:
    """(partial image events, completed events) of one streamed generation."""
    events = list(client.images.generate(model=MODEL, stream=True, **kw))
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(partial) + len(completed) == len(events), [e.type for e in events]
    assert events[-len(completed) :] == completed  # the finished images come last
    return partial, completed


def test_streamed_images_are_the_plain_images_with_partials_spread_over_the_scales(client):
    plain = client.images.generate(model=MODEL, prompt="3", n=2, extra_body={"seed": 21})
    partial, completed = streamed(client, prompt="3", n=2, partial_images=2, extra_body={"seed": 21})

    assert [e.b64_json for e in completed] == [d.b64_json for d in plain.data]
    assert [(e.image_index, e.seed) for e in completed] == [(0, 21), (1, 22)]
    # two previews per image, at scales 3 and 6 of 10 (evenly spread before the last)
    assert [(e.partial_image_index, e.image_index, e.step) for e in partial] == [
        (0, 0, 3),
        (0, 1, 3),
        (1, 0, 6),
        (1, 1, 6),
    ]
    for e in partial + completed:
        assert (e.size, e.output_format, e.background) == ("256x256", "png", "opaque")
        assert decode_png(e.b64_json).size == (256, 256)
    finals = {e.image_index: e.b64_json for e in completed}
    assert all(e.b64_json != finals[e.image_index] for e in partial)  # previews, not the image

    usage = completed[0].usage
    assert usage.output_tokens == 2 * IMAGE_TOKENS and usage.input_tokens == 2  # a class token each
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.text_tokens == 0
    assert usage.model_extra["batch_images"] == 2 and usage.model_extra["forward_passes"] == 10
    assert completed[1].usage == usage  # the request's usage, on each image's event


def test_no_partial_images_by_default_and_three_at_most(client):
    partial, completed = streamed(client, prompt="5", extra_body={"seed": 4})
    assert partial == [] and len(completed) == 1
    partial, completed = streamed(client, prompt="5", partial_images=3, extra_body={"seed": 4})
    assert [e.step for e in partial] == [2, 4, 6] and len(completed) == 1
    image = Image.open(io.BytesIO(base64.b64decode(completed[0].b64_json)))
    assert image.mode == "RGB"


def test_the_client_raises_the_servers_errors_and_the_server_serves_on(client):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(model=MODEL, prompt="1", stream=True, partial_images=4)
    assert e.value.body["param"] == "partial_images"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="1", partial_images=1)
    assert e.value.body["param"] == "partial_images" and "needs stream: true" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="1", stream=True, extra_body={"negative_prompt": "a cat"})
    assert e.value.body["param"] == "negative_prompt"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(model=MODEL, prompt="1", output_format="jpeg")
    assert e.value.body["param"] == "output_format"
    # past its deadline in the stream: an error event, which the client raises
    with pytest.raises(openai.APIError, match="did not finish within its deadline"):
        list(client.images.generate(model=MODEL, prompt="1", stream=True, extra_body={"timeout_s": 1e-6}))
    _, completed = streamed(client, prompt="1", extra_body={"seed": 1})
    assert len(completed) == 1


def test_the_client_lists_and_retrieves_models(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.name, card.steps) == (MODEL, "model", MODEL, 10)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["param"] == "model" and "'nope' is not served here" in e.value.body["message"]
    requests = server.metrics()  # counted under the route's template, not one label per model
    assert any(key[:2] == ("varserve_requests_total", ("route", "/v1/models/{model_id}")) for key in requests)
