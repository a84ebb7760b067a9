"""deployments/lora_settings.py: LoRA's engine arguments follow the adapters listed, not vLLM's defaults."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from deployments.lora_settings import VLLM_LORA_RANKS, adapter_rank, lora_engine_args


def _adapter(folder: Path, rank: int, rank_pattern: dict[str, int] | None = None) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "rank_pattern": rank_pattern or {}}))
    return folder


def test_no_adapters_no_lora() -> None:
    assert lora_engine_args({}, max_per_replica=4) == {}


def test_rank_and_slots_fit_the_adapters(tmp_path: Path) -> None:
    """One rank-8 adapter: a rank-8 LoRA with one slot, not vLLM's rank 16 and four slots, which every token of
    every request, base model's included, would pay for on the CPU."""
    pirate = _adapter(tmp_path / "pirate", 8)
    assert lora_engine_args({"pirate": pirate}, max_per_replica=4) == {
        "enable_lora": True, "max_loras": 1, "max_lora_rank": 8}


def test_the_widest_adapter_sets_the_rank_rounded_up_to_one_vllm_accepts(tmp_path: Path) -> None:
    adapters = {"a": _adapter(tmp_path / "a", 8), "b": _adapter(tmp_path / "b", 4, {"q_proj": 24}),
                "c": _adapter(tmp_path / "c", 2)}
    assert lora_engine_args(adapters, max_per_replica=2) == {"enable_lora": True, "max_loras": 2,
                                                             "max_lora_rank": 32}


def test_an_adapter_that_cannot_be_read_leaves_the_rank_to_vllm(tmp_path: Path) -> None:
    """A hub id (None) or a folder without a readable config: vLLM's default rank (or engine_args') applies."""
    known = _adapter(tmp_path / "known", 8)
    assert "max_lora_rank" not in lora_engine_args({"known": known, "hub": None}, max_per_replica=4)
    assert adapter_rank(tmp_path / "missing") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    assert adapter_rank(tmp_path / "broken") is None


def test_the_ranks_are_the_ones_vllm_accepts() -> None:
    from vllm.config.lora import MaxLoRARanks

    assert VLLM_LORA_RANKS == typing.get_args(MaxLoRARanks)


def test_the_default_config_derives_a_lora_sized_to_its_adapter() -> None:
    """What `make serve` gives the default model's engine: the pirate adapter's rank, one slot (needs `make model`,
    which every test run does first)."""
    import yaml

    from deployments.config import parse_args

    root = Path(__file__).resolve().parents[2]
    document = yaml.safe_load((root / "configs" / "local.yaml").read_text())
    model = parse_args(document["applications"][0]["args"]).models[0]
    if not model.local_source() or not model.local_source().exists():
        pytest.skip("the default model is not built")
    overrides = model.engine_overrides()
    assert (overrides["enable_lora"], overrides["max_loras"], overrides["max_lora_rank"]) == (True, 1, 8)
