"""The HTTP edge: request and response bodies (pydantic). Inside the server, plain dataclasses."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from models.settings import KV_POLICY_NAMES, MAX_WINDOW

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4000


def _prompt(value):
    """A class index (a JSON integer) or a text: checked before the union is, so that an error
    names the field itself, not a branch of the union ("prompt.int")."""
    if type(value) is int:
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("prompt_type", "give a class index (an integer) or a text")
    if not value.strip():
        raise PydanticCustomError("prompt_empty", "is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise PydanticCustomError(
            "prompt_long",
            "is {length} characters: at most {limit}",
            {"length": len(value), "limit": MAX_PROMPT_CHARS},
        )
    return value


Prompt = Annotated[int | str, BeforeValidator(_prompt)]
# Types as JSON has them: "n": "2" or true, "stream": "yes", "cfg_scale": NaN are refused, not
# converted (an integer is a valid float); a request says what it means.
STRICT_FIELDS = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SpeculativeFields(BaseModel):
    """Speculative decoding of next-token models; a key left out takes the model's default
    (`[model.speculative]` in the config, else method "none", window "auto")."""

    model_config = STRICT_FIELDS

    method: Literal["none", "sjd", "scd", "gsd"] | None = Field(
        None,
        description="none: a token per forward pass; sjd: speculative Jacobi decoding and scd: its coupled "
        "variant (both sample the model's own distribution); gsd: grouped acceptance (lossy, fastest)",
    )
    window: int | Literal["auto"] | None = Field(
        None,
        description=f"tokens verified per forward pass, 1..{MAX_WINDOW}, or 'auto': picked from the model's "
        "measured cost of a window and the image's acceptance so far (falls back to 1, plain decoding)",
    )
    group: int | None = Field(
        None, ge=0, le=64, description="gsd: neighbours either side in the target's ranking"
    )
    p_threshold: float | None = Field(
        None, gt=0, le=1, description="gsd: a neighbour's probability within this of the draft's"
    )
    distance: float | None = Field(
        None,
        gt=0,
        description="gsd: a neighbour's squared embedding distance to the draft within this times the mean "
        "over token pairs",
    )

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value):
        # checked here so that the error names `speculative.window`, not a branch of the union
        if value is None or value == "auto" or (type(value) is int and 1 <= value <= MAX_WINDOW):
            return value
        raise ValueError(f'give an integer 1..{MAX_WINDOW} or "auto"')


class GenerationFields(BaseModel):
    """What both generation routes take. A class-conditional model takes `prompt` or `class_label`
    as an index or an ImageNet class name; a text-conditional one takes a text `prompt`."""

    model_config = STRICT_FIELDS

    model: str | None = Field(None, description="model name; may be left out when one model is served")
    prompt: Prompt | None = None
    class_label: Prompt | None = Field(None, description="class index or ImageNet class name")
    n: int = Field(1, ge=1, description="images; at most the server's max_images")
    size: str | None = Field(None, description="'256x256' and the like: must be the model's resolution")
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of image 0; image i uses seed + i")
    cfg_scale: float | None = Field(
        None,
        ge=0,
        le=100,
        description="guidance scale in the family's own convention: VAR (1 + t) * cond - t * uncond "
        "with t ramping to cfg_scale over the scales (0: none); LlamaGen uncond + cfg_scale * "
        "(cond - uncond) (1: none)",
    )
    cfg_interval: int | None = Field(
        None,
        ge=-1,
        description="next-token models: guidance for image tokens 0..cfg_interval only (-1: all)",
    )
    negative_prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="text models: the caption the guidance branch reads instead of the null caption, so "
        "the image is steered away from it (needs guidance)",
    )
    top_k: int | None = Field(None, ge=0, description="0: off")
    top_p: float | None = Field(None, ge=0, le=1, description="0: off")
    temperature: float | None = Field(None, gt=0, le=100)
    timeout_s: float | None = Field(None, gt=0, description="deadline from arrival; at most the server's")
    kv_policy: Literal[KV_POLICY_NAMES] | None = Field(
        None,
        description="next-scale models: what the KV cache keeps of earlier scales (README, KV-cache "
        "compression); next-token models take 'full' only. Default: the model's",
    )
    kv_budget: float | None = Field(
        None,
        gt=0,
        le=1,
        description="next-scale models: the fraction of the full stored KV prefix a compressing policy "
        "keeps ('full' and next-token models ignore it). Default: the model's",
    )
    kv_merge: bool | None = Field(
        None,
        description="next-scale models: fold the keys a policy evicts into their nearest kept key instead "
        "of dropping them (every policy but full, which ignores it; heatkv folds the scales it drops); "
        "next-token models take false only. Default: the model's",
    )
    speculative: SpeculativeFields | None = Field(
        None,
        description="next-token models: speculative decoding, several tokens per forward pass "
        '(e.g. {"method": "scd", "window": 16}); next-scale models take none',
    )


MAX_PARTIAL_IMAGES = 3  # the OpenAI Images API's bound


class ImagesRequest(GenerationFields):
    """POST /v1/images/generations: the OpenAI Images API shape plus our extensions."""

    user: str | None = Field(None, max_length=256, description="accepted for compatibility; unused")
    output_format: Literal["png"] = "png"
    stream: bool = Field(
        False,
        description="server-sent events as the OpenAI Images API streams them: `image_generation."
        "partial_image` events, then `image_generation.completed`, for each image",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="with stream: previews per image, spread over the scales (VAR) or token rows (LlamaGen)",
    )


class GenerateRequest(GenerationFields):
    """POST /v1/generate: with stream=true, server-sent events (a preview per step, then the result)."""

    stream: bool = False


class ImageData(BaseModel):
    b64_json: str
    seed: int


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0


class Usage(BaseModel):
    latency_ms: float = Field(description="arrival to response")
    queue_ms: float = Field(description="arrival to the start of the request's first batch")
    inference_ms: float = Field(description="engine time of the request's batches")
    forward_passes: int = Field(description="model forward calls spent on the request's batches")
    kv_bytes: int = Field(
        description="peak stored KV-cache bytes of the request's batches: what carries earlier scales or "
        "tokens forward (VAR: the prefix the last scale reads)"
    )
    kv_bytes_full: int = Field(description="the same for an uncompressed KV cache")
    kv_bytes_working: int = Field(description="peak KV bytes including the scale or token being computed")
    batch_images: int = Field(description="images in the (largest) batch the request ran in")
    kv_blocks: int | None = Field(
        None, description="next-token models: KV blocks the running batch held at most while the request ran"
    )
    kv_blocks_free: int | None = Field(None, description="next-token models: free KV blocks when it finished")
    # OpenAI's token counts (gpt-image): a request's condition positions and image tokens
    input_tokens: int = Field(description="condition positions the model read: a class token or a caption's")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="image tokens sampled (VAR: 680 per 256-px image; LlamaGen: 256)")
    total_tokens: int


class ImagesResponse(BaseModel):
    id: str
    created: int
    model: str
    data: list[ImageData]
    usage: Usage


class PreviewEvent(BaseModel):
    """One SSE `preview` event: the request's images decoded after a scale (VAR) or row (LlamaGen)."""

    step: int
    total: int
    images: list[str] = Field(description="base64 PNG, one per image of the request")


class ImageEventFields(BaseModel):
    """What both OpenAI image streaming events carry. `image_index` (which of the request's images)
    and `seed` are ours: OpenAI's events name no image, since its streams carry one."""

    b64_json: str
    created_at: int
    size: str
    output_format: Literal["png"] = "png"
    background: Literal["opaque"] = "opaque"
    quality: Literal["auto"] = "auto"
    image_index: int
    seed: int


class PartialImageEvent(ImageEventFields):
    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int
    step: int = Field(description="the scale (VAR) or token row (LlamaGen) the preview shows")
    total: int


class CompletedImageEvent(ImageEventFields):
    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: Usage = Field(description="the request's, on each of its images' events")


class SamplingDefaultsCard(BaseModel):
    cfg_scale: float
    top_k: int
    top_p: float
    temperature: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    name: str
    family: str
    loaded: bool
    conditioning: str | None = None
    resolution: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = Field(None, description="the config's names of the classes, by index")
    steps: int | None = None
    defaults: SamplingDefaultsCard
    kv_policies: list[str] | None = Field(None, description="next-scale models: the kv_policy choices")
    kv_policy: str | None = Field(None, description="the model's default kv_policy")
    kv_budget: float | None = Field(None, description="the model's default kv_budget")
    kv_merge: bool | None = Field(None, description="the model's default kv_merge")
    speculative_methods: list[str] | None = Field(
        None, description="next-token models: the speculative.method choices"
    )
    speculative_method: str | None = Field(None, description="the model's default speculative.method")
    speculative_window: int | str | None = Field(None, description="the model's default speculative.window")
    speculative_group: int | None = Field(None, description="the model's default speculative.group (gsd)")
    speculative_p_threshold: float | None = Field(
        None, description="the model's default speculative.p_threshold (gsd)"
    )
    speculative_distance: float | None = Field(
        None, description="the model's default speculative.distance (gsd)"
    )
    kv_cache_bytes: int | None = Field(
        None,
        description="the server's --kv-cache-bytes (null: not set): static batches plan at most "
        "this many KV bytes (a larger request runs alone); next-token models' running batch has a "
        "block pool of this size",
    )
    kv_bytes_per_image: int | None = Field(
        None,
        description="planned KV bytes of one image in a static batch at the model's defaults "
        "(next-scale: its kv_policy and kv_budget): what it counts against kv_cache_bytes",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class Status(BaseModel):
    status: str
    detail: str | None = None
