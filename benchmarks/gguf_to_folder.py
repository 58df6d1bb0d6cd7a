"""Write a .gguf model (as transformers dequantizes it) and its tokenizer as a safetensors model folder.

Loading a GGUF file parses its whole vocabulary and dequantizes every tensor on each load (about 90 s for Gemma 3
270M here, against 12 s for the folder), and accelerate cannot offload a GGUF-loaded model to disk; the folder has
neither problem. Usage: python benchmarks/gguf_to_folder.py MODEL.gguf OUT [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from attnprune_opt.atomic import atomic_output_dir, check_output_dir
from attnprune_opt.export.save import plain_checkpoint
from attnprune_opt.models.loading import load_model, load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    model = load_model(str(args.gguf), dtype=torch.float32)
    tokenizer = load_tokenizer(str(args.gguf))
    with atomic_output_dir(args.out, args.overwrite) as tmp, plain_checkpoint(model):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"saved {args.gguf.name} as {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
