"""A model's outputs on a batch, and its greedy continuation as ``model.generate(do_sample=False)`` makes it.

``outputs_and_greedy`` gets both from one prefill: the prompt's forward (the very call ``outputs`` makes)
keeps its key/value cache, and decoding continues from it token by token, as generate's greedy loop does
(argmax of the float32 logits; a row that produced an end token is padded with ``pad_id`` after it; the
loop stops when every row has ended). generate runs a left-padded prompt at positions counted from its
first real token, ``outputs`` at positions counted from the pad: the continuation is then generate's only
where that shift changes nothing but rounding (rotary positions, relative by construction) or where no row
is padded; elsewhere, and where the model's generation config asks for more than plain greedy decoding
(a repetition penalty, a minimum length, ...), it is generate's own, after a second forward.
"""

from __future__ import annotations

import torch
from torch import nn

PLAIN_GENERATION = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
                    "_from_model_config", "use_cache", "output_attentions", "output_hidden_states",
                    "do_sample", "temperature", "top_k", "top_p", "max_length"}  # fmt: skip  # greedy ignores


@torch.no_grad()
def outputs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's output: logits (LM, seq2seq, classification), QA start/end logits, or hidden states."""
    return head_output(model(**batch), batch)


def head_output(out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A forward's output as ``outputs`` gives it: float32, at the batch's unmasked tokens."""
    if getattr(out, "logits", None) is not None:
        y = out.logits
    elif getattr(out, "start_logits", None) is not None:
        y = torch.stack([out.start_logits, out.end_logits], dim=-1)  # (batch, tokens, 2)
    else:
        y = out.last_hidden_state
    mask = batch.get("decoder_attention_mask", batch["attention_mask"])
    if tuple(y.shape[:2]) != tuple(mask.shape):  # one output per sequence (sequence classification)
        return y.float()
    return y.float()[mask.bool()]  # (tokens, vocab or labels or hidden)


@torch.no_grad()
def greedy(model, batch: dict[str, torch.Tensor], n: int, pad_id: int | None) -> torch.Tensor:
    """generate's n greedy new tokens per row, padded to n as generate pads finished sequences."""
    prompt = {k: v for k, v in batch.items() if not k.startswith("decoder_")}
    out = model.generate(**prompt, max_new_tokens=n, do_sample=False, pad_token_id=pad_id)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    new = out[:, 1:] if seq2seq else out[:, batch["input_ids"].shape[1] :]  # after the decoder start
    return _padded(new, n, pad_id)


def _padded(new: torch.Tensor, n: int, pad_id: int | None) -> torch.Tensor:
    """Continuations that all ended before n tokens, padded to n."""
    if new.shape[1] >= n:
        return new
    fill = torch.full((new.shape[0], n - new.shape[1]), -1 if pad_id is None else pad_id, dtype=new.dtype)
    return torch.cat([new, fill.to(new.device)], dim=1)


@torch.no_grad()
def outputs_and_greedy(
    model, batch: dict[str, torch.Tensor], n: int, pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``outputs`` and ``greedy`` (n tokens; 0: none) of one batch, from one prefill where that gives
    generate's tokens (see the module's docstring), else from two."""
    if not n:
        return outputs(model, batch), None
    if not continues_from_prefill(model, batch, pad_id):
        return outputs(model, batch), greedy(model, batch, n, pad_id)
    out = model(**batch, use_cache=True)
    y, cache = head_output(out, batch), getattr(out, "past_key_values", None)
    if cache is None or getattr(out, "logits", None) is None:
        return y, greedy(model, batch, n, pad_id)
    return y, _continued(model, batch["attention_mask"], out.logits[:, -1], cache, n, pad_id)


def continues_from_prefill(model, batch: dict[str, torch.Tensor], pad_id: int | None) -> bool:
    """Whether decoding on from ``outputs``' own forward gives generate's greedy tokens (up to rounding)."""
    config = getattr(model, "generation_config", None)
    if getattr(model.config, "is_encoder_decoder", False) or config is None or pad_id is None:
        return False
    if set(config.to_diff_dict()) - PLAIN_GENERATION or set(batch) != {"input_ids", "attention_mask"}:
        return False
    padded = bool((batch["attention_mask"] == 0).any())
    return not padded or any("RotaryEmbedding" in type(m).__name__ for m in model.modules())


def _continued(
    model: nn.Module, mask: torch.Tensor, last: torch.Tensor, cache, n: int, pad_id: int
) -> torch.Tensor:
    """n greedy tokens from the prompt's last logits and its cache, as generate's greedy loop picks them."""
    eos = model.generation_config.eos_token_id
    ends = None if eos is None else torch.tensor(eos, device=last.device).reshape(-1)
    running = torch.ones(last.shape[0], dtype=torch.bool, device=last.device)
    new: list[torch.Tensor] = []
    while True:
        token = last.float().argmax(-1)
        if ends is not None:
            token = torch.where(running, token, pad_id)
            running &= ~torch.isin(token, ends)
        new.append(token)
        if len(new) == n or not running.any():
            return _padded(torch.stack(new, 1), n, pad_id)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        last, cache = out.logits[:, -1], out.past_key_values
