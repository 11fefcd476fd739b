"""The serving parts of the configuration: the model, the engine, images, URLs, HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blipserve.config.fields import option

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16", "int8"]
Int8Kernel = Literal["auto", "fbgemm"]
Backend = Literal["auto", "torch", "openvino"]
ImageResize = Literal["auto", "processor", "device"]
VisionAttention = Literal["auto", "eager", "sdpa", "bf16"]


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied while turning bytes into an RGB image."""

    max_image_bytes: int = option(20 * 1024 * 1024, "Largest encoded image accepted, in bytes.")
    max_image_pixels: int = option(
        40_000_000,
        "Largest decoded image accepted, in pixels (width*height); guards against "
        "decompression bombs.",
    )
    draft_decode: bool = option(
        True,
        "Decode large JPEGs at a reduced size (Pillow draft mode) when the model needs far "
        "fewer pixels, never below twice the model's input on a side (closer, it changed "
        "answers), and shrink any image larger than 4x the model's input on a side by a "
        "whole factor per side right after decoding (never below 2x), so a queued row holds "
        "megabytes, not hundreds.",
    )


@dataclass(frozen=True)
class FetchConfig:
    """How image URLs are fetched (safe by default)."""

    allow_url_hosts: tuple[str, ...] = option(
        (),
        "Host (name or IP, optionally host:port) whose URLs are fetched even when it "
        "resolves to an internal address, e.g. 127.0.0.1 for a local image server. "
        "Repeatable.",
        flag="--allow-url-host",
        metavar="HOST",
    )
    allow_urls: bool = option(True, "Accept http(s) image URLs at all.")
    connect_timeout_s: float = option(5.0, "Seconds to wait for a connection to an image URL.")
    read_timeout_s: float = option(
        15.0, "Seconds a whole image download may take (slow-drip responses are cut)."
    )
    max_redirects: int = option(3, "Redirects followed per image URL.")
    max_fetch_bytes: int = option(
        20 * 1024 * 1024, "Largest image download accepted, in bytes (enforced while streaming)."
    )


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where to run it."""

    model: str = option(
        "demo",
        "Model to serve: a built-in name (demo, demo-vqa), a Hugging Face id "
        "(Salesforce/blip-image-captioning-base) or a local save_pretrained folder.",
    )
    device: Device = option("auto", "Where to run: auto (cuda when available), cpu or cuda.")
    dtype: DType = option(
        "auto",
        "Precision: auto (cuda: bfloat16, else float16; cpu: int8), float32, bfloat16, "
        "float16, or int8 (CPU only: Linear layers in int8 with per-row activation scales, "
        "float32 elsewhere).",
    )
    int8_kernel: Int8Kernel = option(
        "auto",
        "Who computes int8 matmuls: auto (blipserve's own kernel where the CPU has AVX-512 "
        "VNNI and a C compiler builds it on first use, else torch's fbgemm) or fbgemm.",
    )
    backend: Backend = option(
        "auto",
        "Who runs the vision encoder on a CPU: auto (OpenVINO for BLIP in int8, the CPU's "
        "auto dtype, where OpenVINO and NNCF are installed, as they are by default; else "
        "torch), torch, "
        "or openvino (converted once and cached in ~/.cache/blipserve/openvino; int8 via "
        "NNCF with --dtype int8, float32 with --dtype float32, else bfloat16 where the CPU "
        "has it).",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) to load.")
    image_resize: ImageResize = option(
        "auto",
        "Who resizes and normalises images for the model: auto (device on a GPU, else "
        "processor), processor (the model's transformers image processor, on the CPU) or "
        "device (torch on the model's device, from 8-bit pixels: within one 8-bit level "
        "of the processor's).",
    )
    vision_batch_size: int = option(
        0,
        "Most images the vision encoder takes in one call; 0: the whole batch. Lets the "
        "text decoder take larger batches (--max-batch-size) than the vision encoder's "
        "activations would leave memory for (which sizes are fastest on a GPU is not "
        "measured yet). torch's vision encoder only, not in int8 (which encodes one image "
        "per call already).",
    )
    vision_attention: VisionAttention = option(
        "auto",
        "How BLIP's vision encoder computes attention: auto (what measured fastest for the "
        "device and dtype: SDPA in float32 and on GPUs, bf16 products in int8 on CPUs with "
        "native bf16), eager (transformers' code), sdpa (torch's fused kernel) or bf16 "
        "(its products in bfloat16). BLIP models only; for comparing them (bench/speed.py).",
    )
    disable_speedup: tuple[str, ...] = option(
        (),
        "Leave out a speed option the model would get, by the name /ready's build reports "
        "(e.g. 'bf16 image keys and values'); repeatable. For diagnosis and side-by-side "
        "measurements: the model then runs transformers' own code for that part. A name "
        "the model does not get on this host (another CPU's option) is logged and ignored; "
        "a name no model gets is refused.",
        metavar="NAME",
        repeatable=True,
    )
    cuda_graphs: bool = option(
        False,
        "BLIP captioning, and BLIP-2 or InstructBLIP with a decoder-only LM (OPT, Vicuna), "
        "on a GPU: decode with a static KV cache, which transformers compiles into CUDA "
        "graphs (torch.compile, mode reduce-overhead). "
        "Batches are padded to a power of two rows and the cache to a multiple of 64 "
        "positions (at least 128) so that a few graphs serve every request; warm-up "
        "compiles them (tens of seconds) before the server reports ready.",
    )

    def __post_init__(self) -> None:
        if self.vision_batch_size < 0:
            raise ValueError(
                f"vision_batch_size must be >= 0 (0: the whole batch); got {self.vision_batch_size}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches rows for the model."""

    max_batch_size: int = option(
        0,
        "Most rows run through the model at once; 0 picks by device: 8 on a CPU (where "
        "larger batches gain little), 64 on a GPU (where one image at a time leaves it idle). "
        "A call that runs out of memory is run again in halves, and that size kept.",
    )
    decode_workers: int = option(
        0,
        "Threads that fetch and decode images in parallel; 0 picks by device: 4 with the "
        "model on a CPU (which needs the cores), one per usable core (4 to 16) with the "
        "model on a GPU (which leaves them to decoding).",
    )
    torch_threads: int = option(
        0, "CPU threads torch runs the model on; 0 keeps torch's default (one per core)."
    )
    model_workers: int = option(
        0,
        "Batches run at once when a call holds several (a batch job's chunk of rows, "
        "'blipserve caption' of many images; the server runs one batch at a time): the "
        "calling thread and model_workers - 1 helpers, each helper on one torch thread; 0 "
        "picks by device: 2 on a CPU with at least 2 torch threads, 1 on a GPU. One batch's "
        "Python-bound decoding steps then overlap another's arithmetic.",
    )

    def __post_init__(self) -> None:
        values = (self.max_batch_size, self.torch_threads, self.model_workers, self.decode_workers)
        if min(values) < 0:
            raise ValueError(
                "max_batch_size, torch_threads, model_workers and decode_workers must be >= 0 "
                f"(0: automatic); got {', '.join(map(str, values))}"
            )


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP endpoint (``blipserve serve``)."""

    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = option(8000, "Port to listen on (0 picks a free one).")
    api_keys: tuple[str, ...] = option(
        (),
        "API key required as 'Authorization: Bearer KEY' on /score, /v1/* and /metrics. "
        "Repeatable; none means no auth (health routes are always open).",
        flag="--api-key",
        metavar="KEY",
        secret=True,
    )
    max_body_bytes: int = option(
        100 * 1024 * 1024, "Largest request body accepted, in bytes (413 above it)."
    )
    max_rows: int = option(1024, "Most rows in one request.")
    max_queue: int = option(
        256, "Most rows waiting for the model; more gives 503 with Retry-After at once."
    )
    max_wait_ms: float = option(
        10.0, "How long the first row of a batch waits for others to join it, in ms."
    )
    request_timeout_s: float = option(
        60.0, "Deadline for a request, from arrival; past it, 504 and its queued work is dropped."
    )
    graceful_timeout_s: float = option(
        30.0, "On SIGTERM, how long in-flight requests may take to finish."
    )
    warmup: bool = option(True, "Run one image through the model before reporting ready.")
    log_level: str = option("info", "uvicorn log level (critical, error, warning, info, debug).")
    otel: bool = option(
        False,
        "OpenTelemetry traces: a span per request (a child of the caller's W3C traceparent) "
        "with spans for fetch, decode, queue wait and the model call; exported over OTLP as "
        "the OTEL_* variables say (pip install 'blipserve[otel]').",
    )
    log_format: Literal["text", "json"] = option(
        "text",
        "Log lines as text, or as JSON objects (one a line: time, level, logger, message, "
        "the request's id, and an access line per request with its status and duration).",
    )
