"""``nvila-quant generate``: answer a prompt about images / videos with an NVILA checkpoint."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from transformers import GenerationConfig

from nvila_quant.commands.common import add_device, add_dtype, add_model, check_model_dir
from nvila_quant.errors import PromptError
from nvila_quant.model.media import Image, Video
from nvila_quant.model.tokenizer import MEDIA_TOKENS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an answer for images/videos and a prompt",
        description="Load an NVILA checkpoint (float or quantized) and answer a prompt. Media go before the "
        "text unless the prompt places them with <image> / <vila/video> markers (one per --image / --video, "
        "in order).",
    )
    add_model(p, help="NVILA checkpoint folder (float or quantized)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file or a folder of frames (repeatable)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (KV-cached stream_gen)")
    add_dtype(p, "auto", auto=True,
              help="compute dtype (default: the checkpoint's model_dtype; fp32 on CPU is exact but slow)")
    add_device(p)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.set_defaults(func=run)


def build_prompt(prompt: str, images: list[str], videos: list[str]) -> list:
    """Interleave media with text at <image>/<vila/video> markers, or put them first when there are none."""
    media = {"image": [Image(p) for p in images], "video": [Video(p) for p in videos]}
    pattern = "(" + "|".join(re.escape(t) for t in MEDIA_TOKENS.values()) + ")"
    pieces = re.split(pattern, prompt)
    markers = {name: sum(1 for x in pieces if x == tok) for name, tok in MEDIA_TOKENS.items()}
    if not any(markers.values()):
        return [*media["image"], *media["video"], prompt]
    for name, tok in MEDIA_TOKENS.items():
        if markers[name] != len(media[name]):
            raise PromptError(
                f"the prompt has {markers[name]} {tok} marker(s) but {len(media[name])} --{name} file(s) were given"
            )
    parts: list = []
    it = {name: iter(items) for name, items in media.items()}
    by_token = {tok: name for name, tok in MEDIA_TOKENS.items()}
    for piece in pieces:
        if piece in by_token:
            parts.append(next(it[by_token[piece]]))
        elif piece:
            parts.append(piece)
    return parts


def run(args: argparse.Namespace) -> int:
    from nvila_quant.model import NVILAQwen2

    check_model_dir(args.model)
    for path in args.image + args.video:
        if not Path(path).exists():
            raise PromptError(f"media file not found: {path}")
    parts = build_prompt(args.prompt, args.image, args.video)
    dtype = None if args.dtype == "auto" else args.dtype
    model = NVILAQwen2.load_pretrained(args.model, torch_dtype=dtype, device=args.device)
    config = model.default_generation_config
    config.max_new_tokens = args.max_new_tokens
    config.max_length = None
    config.do_sample = args.do_sample
    if args.do_sample:
        config.temperature, config.top_p = args.temperature, args.top_p
        torch.manual_seed(args.seed)
    else:
        config.temperature = config.top_p = config.top_k = None
    if args.stream:
        for piece in model.stream_content(parts, config):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(model.generate_content(parts, GenerationConfig(**config.to_dict())))
    return 0
