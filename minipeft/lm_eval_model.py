"""A minipeft model inside EleutherAI's lm-evaluation-harness (lm-eval >= 0.4): `MinipeftLM`.

Published scores (Meta's Llama 3.2 model card among them) come from lm-eval's task files. This wrapper
lets the same task files score a minipeft checkpoint, with or without an adapter (docs/lm-eval.md):

    .venv-eval/bin/python -m minipeft.lm_eval_model --model minipeft --tasks gsm8k,mmlu \\
        --model_args checkpoint=~/models/Llama-3.2-1B,adapter=runs/Llama-3.2-1B/lora,dtype=bfloat16

    from lm_eval import simple_evaluate
    simple_evaluate(model=MinipeftLM(checkpoint="~/models/Llama-3.2-1B"), tasks=["gsm8k"])

lm-eval asks three kinds of request (lm_eval/api/model.py, class LM):
* loglikelihood (context, continuation): log p(continuation | BOS + context) in nats, and whether greedy
  decoding would produce it. The pair is tokenised as lm-eval's Hugging Face model does (trailing
  spaces of the context move to the continuation; the whole is encoded, then split at the context's
  length). One forward per batch; requests that differ only in their last token share a row, and the
  positions that predict the continuation are answer positions, as in minipeft.scoring.continuation_logprobs.
* loglikelihood_rolling (text,): minipeft.scoring.sliding_window_nll over BOS + text; windows of
  max_length tokens, each token scored once (stride max_length - 1 unless `stride=` says otherwise).
* generate_until (context, gen_kwargs): batched KV-cached Llama.generate, stopped at the tokenizer's stop
  ids (EOS, <|eom_id|>, <|eot_id|>), decoded, and cut before the first `until` string. The context is
  left-truncated to max_length - max_gen_toks tokens, as lm-eval's Hugging Face model does.

Text is encoded after <|begin_of_text|> unless it already starts with it (a chat template's output);
special-token text in a prompt is read as the special token, as Hugging Face tokenizers do.
Chat prompts (--apply_chat_template) use minipeft's Llama 3 format (Tokenizer.encode_dialog_prompt,
Meta's reference: no default system turn). Only this module imports lm_eval (`pip install '.[eval]'`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  the built-in models: lm-eval imports them only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .adapters import load_adapter
from .base import autocast, load_run_base, pick_device
from .data import cut_at_stop
from .llama import Llama
from .runs import run_settings
from .scoring import sliding_window_nll
from .tokenizer import Tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BOS_TEXT = "<|begin_of_text|>"


@register_model("minipeft")
class MinipeftLM(LM):
    """A minipeft Llama (a checkpoint folder, or a model in memory) plus an optional adapter, for lm-eval."""

    def __init__(self, checkpoint: str | None = None, adapter: str | None = None, dtype: str = "auto",
                 device: str | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, stride: int | None = None, seed: int = 1234,
                 model: Llama | None = None, tokenizer: Tokenizer | None = None, max_batch_size: int | None = None):
        """checkpoint: an HF or Meta folder with its tokenizer (default: a finetune run's own base); or model=
        and tokenizer= in memory. adapter: a finetune run folder (holding adapter/) or an adapter folder.
        dtype: bfloat16, float16, float32 or auto (bf16 on CUDA, fp32 on CPU). batch_size "auto" means 16;
        max_batch_size is accepted and ignored."""
        super().__init__()
        try:
            self._device = pick_device(str(device or "auto"))
        except ValueError as e:  # lm-eval's CLI says --device cuda:0 unless told; its HF model falls back too
            self._device = pick_device("auto")
            logging.getLogger(__name__).warning("%s: using %s", e, self._device)
        if model is None:
            run = run_settings(adapter)  # a finetune run knows its base, and how it ran it (base.load_run_base)
            if not (checkpoint or run.get("checkpoint") or run.get("preset")):
                raise ValueError("MinipeftLM: give checkpoint=FOLDER (--model_args checkpoint=...), "
                                 "or model= and tokenizer=")
            if dtype != "auto" and dtype not in DTYPES:
                raise ValueError(f"MinipeftLM: dtype={dtype!r}; expected auto or one of {sorted(DTYPES)}")
            model, loaded_tok, checkpoint = load_run_base(run, self._device, checkpoint, progress=False,
                                                          dtype=DTYPES.get(dtype))
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("MinipeftLM: model= needs its tokenizer= too")
        tokenizer.check_model_vocab(model.config.vocab_size, str(checkpoint or "the model"))
        if adapter:
            run = Path(adapter).expanduser()
            load_adapter(model, run / "adapter" if (run / "adapter").is_dir() else run)
        self.model, self.tok = model.eval(), tokenizer
        self._device = model.embed_tokens.weight.device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = min(int(max_length or model.config.max_seq_len), model.config.max_seq_len)
        self.max_gen_toks, self.stride = int(max_gen_toks), int(stride or self.max_length - 1)
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # ------------------------------------------------------------------ tokenisation

    def encode(self, text: str) -> list[int]:
        """BOS + text, unless the text already starts with BOS's text; special-token text read as specials."""
        return self.tok.encode(text, bos=not text.startswith(BOS_TEXT), allowed_special="all")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's TemplateLM._encode_pair; an empty context is BOS."""
        if not context:
            return [self.tok.bos_id], self.tok.encode(continuation, allowed_special="all")
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    @property
    def tokenizer_name(self) -> str:
        return f"minipeft-{Path(self.tok.source).name}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "Llama 3 chat format (minipeft.tokenizer.Tokenizer.encode_dialog_prompt)"

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The messages in the Llama 3 chat format, as text; add_generation_prompt=False continues the last
        assistant message instead of opening a new one (lm-eval's gen_prefix)."""
        if add_generation_prompt or chat_history[-1]["role"] != "assistant":
            ids = self.tok.encode_dialog_prompt(chat_history, add_generation_prompt)
        else:
            *head, last = chat_history
            ids = (self.tok.encode_dialog_prompt(head, add_generation_prompt=False)
                   + self.tok.encode_header("assistant") + self.tok.encode(last["content"].strip()))
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ the three requests

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs, rows = [], {}  # rows: tokens of one forward row -> the requests it scores
        for i, request in enumerate(requests):
            ctx, cont = self.encode_pair(*request.args[:2])
            whole = (ctx + cont)[-(self.max_length + 1):]  # left-truncated as lm-eval's HF model does
            pairs.append((len(whole) - len(cont), cont))
            rows.setdefault(tuple(whole[:-1]), []).append(i)
        out: list = [None] * len(pairs)
        keys = sorted(rows, key=len, reverse=True)
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start:start + self.batch_size]
            idx = torch.full((len(batch), len(batch[0])), self.tok.pad_id, dtype=torch.long)  # (B, T), right-padded
            answer = torch.zeros_like(idx, dtype=torch.bool)  # (B, T): positions that predict a continuation token
            for b, key in enumerate(batch):
                idx[b, :len(key)] = torch.tensor(key)
                answer[b, min(pairs[i][0] for i in rows[key]) - 1:len(key)] = True
            with autocast(self._device):
                logits = self.model(idx.to(self._device), answer_mask=answer.to(self._device))  # (B, T, vocab)
            for b, key in enumerate(batch):
                for i in rows[key]:
                    n_ctx, cont = pairs[i]
                    logp = logits[b, n_ctx - 1:n_ctx - 1 + len(cont)].float().log_softmax(-1)  # (len(cont), vocab)
                    target = torch.tensor(cont, device=self._device)
                    out[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            nll, _ = sliding_window_nll(self.model, self.encode(request.args[0]), self.max_length, self.stride,
                                        self.batch_size)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, -nll)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one batch never mixes generation settings
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
            temperature = float(kwargs.get("temperature", 0.0))
            if not kwargs.get("do_sample", temperature > 0):
                temperature = 0.0  # lm-eval: do_sample false means greedy, whatever the temperature
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            prompts = {i: self.encode(requests[i].args[0])[-(self.max_length - max_new):] for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))  # similar lengths: less left padding
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                with autocast(self._device):
                    new = self.model.generate([prompts[i] for i in chunk], max_new, temperature,
                                              float(kwargs.get("top_p", 1.0)), self.tok.stop_ids, self.generator)
                for i, ids in zip(chunk, new):
                    out[i] = cut_at_stop(self.tok.decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main() -> None:
    """lm-eval's own command line, with the "minipeft" model registered (`lm_eval` alone cannot see it)."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
