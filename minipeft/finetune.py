"""Fine-tune a Llama with any minipeft method: the training loop (the command line's plumbing is in runs.py).

    .venv/bin/python -m minipeft.finetune                          # toy base + toy task, LoRA: runs/toy/lora
    .venv/bin/python -m minipeft.finetune --checkpoint ~/models/Llama-3.2-1B --data data/gsm8k \\
        --method lora --set r=16 --set alpha=32 --epochs 1 --lr 2e-4 --out runs/lora-1b
    .venv/bin/python -m minipeft.finetune --resume runs/lora-1b    # continue after a crash (make resume RUN=...)
    .venv/bin/python -m minipeft.finetune --task mmlu              # another task (minipeft/tasks.py), its toy analogue
    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 -m minipeft.finetune ...
                                                                   # N processes (FSDP2 or DDP): minipeft/distributed.py

What one optimiser step does (`train_step`): the micro-batches of the step are collated first, so
each micro-batch's loss can be weighted by its share of the step's answer tokens; then forward under
bf16 autocast on CUDA (fp32 on CPU), backward, gradient clipping, a NaN/inf check, AdamW with the
method's parameter groups (`peft.param_groups`: the LoRA+ B-matrix boost and no-decay tags), and the
warmup + cosine schedule. Loss is the mean cross-entropy over answer tokens only (the prompt is masked
with -100 by data.encode_example); it is reported in bits per token (nats / ln 2).

The run folder, resuming, the command line's settings and the plots are in minipeft/runs.py. Under
torchrun every step is the same with `world` (minipeft/distributed.py): each rank computes its share of
every micro-batch, the counts are summed over the ranks, and rank 0 alone writes files.
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .adapters import METHODS, apply_method, method_module
from .base import autocast, pick_device
from .data import IGNORE, Batch, Example, attention_segments, bucket_batches, collate, pack
from .distributed import World, failure_message
from .llama import Llama
from .peft import applied_configs, count_parameters, param_groups, run_step_hooks, trainable_report
from .plots import plot_losses
from .quant import quantize_model
from .runs import (STATE_FILE, Metrics, TrainConfig, build_parser, check_config, check_resume_flags, config_from_args,
                   describe_method, given_settings, load_checkpoint, mean_throughput, peak_memory,
                   prepare_run_folder, progress_bar, remove_temp_files, resume_config, save_checkpoint, saved_step,
                   saved_step_or_none, say, start_run, summary_line)
from .safetensors_io import write_json
from .scoring import LN2, bits_per_token, evaluate, summary_figures
from .sparse_attention import describe as describe_sparse
from .tasks import encode_all, load_task


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last saved adapter is kept."""


# ----------------------------------------------------------------------------- data order

class DataPlan:
    """Which micro-batches each optimiser step uses: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches the interrupted one would have seen. With `world` (torchrun) every
    rank plans the same global micro-batches and takes its share of each (`share`)."""

    def __init__(self, encoded: Sequence[Example], cfg: TrainConfig, pad_id: int, world: World | None = None):
        self.encoded, self.cfg, self.pad_id, self.world = list(encoded), cfg, pad_id, world or World()
        self.rows = pack(self.encoded, cfg.max_len, pad_id) if cfg.pack else None  # packing is fixed
        n_micro = len(self._epoch(0))
        self.steps_per_epoch = n_micro // cfg.grad_accum  # a remainder of micro-batches is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.encoded)} training examples make {n_micro} micro-batches of "
                             f"{cfg.batch_size}: fewer than --grad-accum {cfg.grad_accum}")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self._cache: tuple[int, list] | None = None

    def _epoch(self, epoch: int) -> list:
        seed = self.cfg.seed * 1000 + epoch
        if self.rows is not None:  # shuffle the packed rows, then cut batches
            order = torch.randperm(len(self.rows[0]), generator=torch.Generator().manual_seed(seed))
            return [order[i:i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]
        return bucket_batches(self.encoded, self.cfg.batch_size, shuffle=True, seed=seed)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_batches(self, step: int) -> list[Batch]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._epoch(epoch))
        micro = self._cache[1][i * self.cfg.grad_accum:(i + 1) * self.cfg.grad_accum]
        return [self.share(b) for b in micro]

    def share(self, batch) -> Batch:
        """This rank's rows of a global micro-batch (examples or packed rows): r, r + N, r + 2N, ...
        A rank left without any (a batch smaller than N) gets the batch's first row with every target
        masked: it still runs the forward and backward that the collectives need, with no loss weight."""
        n, r = self.world.size, self.world.rank
        mine = batch[r::n] if len(batch) > r else batch[:1]
        out = tuple(t[mine] for t in self.rows) if self.rows is not None else collate(mine, self.pad_id)
        return out if len(batch) > r else (out[0], torch.full_like(out[1], IGNORE), out[2])


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- one step

def train_step(model, forward, opt: torch.optim.Optimizer, batches: Sequence[Batch], clip: float,
               device: torch.device, step: int | None = None, world: World | None = None) -> tuple[float, int, int, float]:
    """One optimiser step over `batches` (gradient accumulation); returns (loss in bits per answer
    token, input tokens processed, answer tokens, gradient norm). Raises Diverged, before touching
    any weight, if the loss or the gradient norm is not finite. Loss terms a method registered with
    peft.add_extra_loss are added to each micro-batch's loss (trained on, not reported); hooks
    registered with peft.add_step_hook run after the optimiser step with `step` (the global step,
    from 1), while the gradients are still there. Under torchrun (`world`) `batches` are this rank's
    shares; counts, loss and gradient norm are the whole step's, the same on every rank."""
    world = world or World()
    n_answer = int(world.sum(sum(int((t != -100).sum()) for _, t, _ in batches))[0])
    if n_answer == 0:  # train() drops examples without answer tokens, so this is a caller's mistake
        raise ValueError("train_step: the step's batches hold no answer token (all targets are -100)")
    loss_sum, tokens = 0.0, 0
    extra_losses = getattr(model, "peft_extra_losses", [])  # loss terms a method adds (peft.add_extra_loss)
    want_logits = any(getattr(fn, "needs_logits", False) for fn in extra_losses)
    for i, (idx, targets, seg) in enumerate(batches):
        masked = attention_segments(targets, seg) is not None  # False: right-padded, unpacked -> no mask
        idx, targets, seg = idx.to(device), targets.to(device), seg.to(device)
        n = int((targets != -100).sum())
        weight = n / n_answer * world.size  # DDP and FSDP average the ranks' gradients: x N makes it their sum
        if n == 0 and world.size == 1:
            continue
        if n == 0:  # an empty share (DataPlan.share): one target for a finite loss, weight 0
            targets, weight = targets.clone().index_fill_(1, torch.tensor([0], device=device), 0), 0.0
        with world.no_sync(forward, last=i == len(batches) - 1):
            with autocast(device):
                logits, loss = forward(idx, targets, segment_ids=seg if masked else None, return_logits=want_logits)
                extra = sum(fn(model, forward, (idx, targets, seg), logits) for fn in extra_losses)
            ((loss + extra) * weight).backward()  # token-weighted: the same gradient as one big batch
        loss_sum += loss.item() * n
        tokens += int((seg != 0).sum()) if n else 0
    loss_sum, tokens = world.sum(loss_sum, tokens)
    params = [p for g in opt.param_groups for p in g["params"]]
    grad_norm = world.clip_grad_norm(params, clip if clip > 0 else float("inf"))
    bits = loss_sum / max(n_answer, 1) / LN2
    if not (math.isfinite(bits) and math.isfinite(grad_norm)):
        opt.zero_grad(set_to_none=True)
        raise Diverged(f"loss {bits:.4g} bits/token, gradient norm {grad_norm:.4g}")
    opt.step()
    run_step_hooks(model, step)  # before zero_grad: a hook may read the gradients
    opt.zero_grad(set_to_none=True)
    return bits, int(tokens), n_answer, grad_norm


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, world: World | None = None) -> dict:
    """Run (or resume) a fine-tuning job; returns the summary written to RUN/summary.json. Under
    torchrun every rank calls it with its `world` (minipeft/distributed.py); rank 0 writes the files."""
    check_config(cfg)
    world = world or World()
    world.configure(cfg)
    progress = progress and world.main
    run, t_start = Path(cfg.out).expanduser(), time.time()
    device = world.device if world.size > 1 else pick_device(cfg.device)

    def prepare_folder() -> None:
        if not resume:  # the marker first: an interrupted run is still known as a run of ours (--overwrite)
            start_run(run, cfg)  # also records the base's and the data's sha256, which --resume checks
        remove_temp_files(run)  # left by an earlier run that died on a full disk
    world.on_main(prepare_folder)
    if cfg.recipe:
        say(progress, cfg.recipe["line"])
    say(progress, f"run folder: {run}" + (" (resuming)" if resume else ""))
    if world.size > 1:
        say(progress, f"{world.size} processes, --parallel {world.parallel} (minipeft/distributed.py)")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tok, base_name = world.load_base(cfg, device, progress)
    if cfg.attention != "dense":  # before the baseline, so base and fine-tuned model see the same pattern
        model.config = dataclasses.replace(model.config, attention=cfg.attention, sparse_block=cfg.sparse_block,
                                           sparse_summary=cfg.sparse_summary)
        say(progress, describe_sparse(cfg.attention, cfg.sparse_block, cfg.sparse_summary, device))
    if cfg.quantize:  # QLoRA: a frozen NF4 (or int8) base, quantised before the method wraps it
        quantize_model(model, cfg.quantize)
    train_set, test_set, data_name = load_task(cfg.data, cfg.limit, cfg.task, cfg.train_split)
    test_set = test_set[:cfg.eval_limit] if cfg.eval_limit else test_set
    test_enc = encode_all(tok, test_set, cfg.format, cfg.max_len, cfg.task)
    if not any(t != -100 for _, targets in test_enc for t in targets):
        raise ValueError(f"--max-len {cfg.max_len}: no test example keeps an answer token (the prompts fill the "
                         "whole length), so bits/token is undefined; raise --max-len")
    train_enc, n_no_answer = with_answer_tokens(encode_all(tok, train_set, cfg.format, cfg.max_len, cfg.task),
                                                cfg.max_len)
    if n_no_answer:
        say(progress, f"skipping {n_no_answer} of {len(train_set)} training examples: no answer token within "
                      f"--max-len {cfg.max_len}")
    plan = DataPlan(train_enc, cfg, tok.pad_id, world)

    def full_eval(tag: str) -> dict:  # whole on every rank (identical figures); rank 0 writes the predictions
        return evaluate(model, tok, test_set, cfg.format, cfg.max_len, cfg.eval_batch_size, cfg.max_new_tokens,
                        run / f"predictions{tag}.jsonl" if world.main else None, task=cfg.task, progress=progress)

    metrics = Metrics(run / "metrics.jsonl", keep_until_step=saved_step(run) if resume else None, write=world.main)
    if cfg.baseline and not resume and world.parallel == "fsdp":
        say(progress, "no evaluation of the base model under FSDP (ranks > 0 hold no base model before the "
                      "method is in place); `make evaluate` gives it")
    elif cfg.baseline and not resume:
        say(progress, f"evaluating the base model on {len(test_set)} test problems ...")
        metrics.log(kind="baseline", step=0, **full_eval("_base"))
        say(progress, f"  base: {metrics.records[-1]['test_bpt']:.4f} bits/token, "
                      f"accuracy {metrics.records[-1]['accuracy']:.1%}")

    opt, sched = prepare_model(model, cfg, plan.total_steps, device, world)
    forward = world.wrap(model)  # DDP(model) under DDP; the (sharded) model itself otherwise
    forward = torch.compile(forward, dynamic=True) if cfg.compile else forward  # one graph for every batch shape
    start = load_checkpoint(run, model, opt, sched, world) if resume else 0
    trainable, total = count_parameters(model)
    if not resume:
        world.on_main(lambda: write_json(run / "config.json", dict(
            run_id=uuid.uuid4().hex, n_train_skipped_no_answer=n_no_answer,
            train=asdict(cfg), method_config=applied_configs(model), base=base_name, data=data_name,
            trainable_params=trainable, total_params=total, trainable_report=trainable_report(model),
            steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, n_train=len(train_set),
            n_test=len(test_set), device=str(device), torch=torch.__version__, world_size=world.size)))
    say(progress, trainable_report(model))
    say(progress, f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch), {len(train_set)} train / "
                  f"{len(test_set)} test examples" + (f"; resuming at step {start}" if resume else ""))

    def evaluate_loss(step: int, epoch: int, epoch_end: bool) -> str:
        test_bpt, last = bits_per_token(model, test_enc, cfg.eval_batch_size, tok.pad_id), metrics.last_step("eval")
        metrics.log(kind="eval", step=step, epoch=epoch, train_bpt=metrics.mean_train_bits(after=last),
                    test_bpt=test_bpt)
        line = f"step {step}: train {metrics.records[-1]['train_bpt']:.4f}  test {test_bpt:.4f} bits/token"
        if epoch_end:
            metrics.log(kind="epoch", step=step, epoch=epoch, train_bpt=metrics.mean_train_bits(epoch=epoch),
                        test_bpt=test_bpt)
            line += f"  (epoch {epoch + 1} done; its mean train loss {metrics.records[-1]['train_bpt']:.4f})"
        return line

    training_loop(model, forward, opt, sched, plan, cfg, run, metrics, device, start, evaluate_loss, progress, world)
    say(progress, f"evaluating the fine-tuned model on {len(test_set)} test problems ...")
    final = full_eval("")
    metrics.log(kind="final", step=plan.total_steps, **final)
    train_recs = [r for r in metrics.records if r["kind"] == "train"]
    base = next((r for r in metrics.records if r["kind"] == "baseline"), None)
    summary = dict(method=cfg.method, base=base_name, data=data_name, trainable_params=trainable,
                   total_params=total, trainable_pct=100 * trainable / total, steps=plan.total_steps,
                   before=None if base is None else summary_figures(base),
                   after=summary_figures(final), n_test=len(test_set),
                   train_seconds=sum(r["tokens"] / r["tokens_per_s"] for r in train_recs),
                   tokens_per_s=mean_throughput(train_recs), peak_mem_gib=peak_memory(device),
                   wall_seconds=time.time() - t_start, lr=cfg.lr, recipe=cfg.recipe or None)
    world.on_main(lambda: (write_json(run / "summary.json", summary),
                           plot_losses(metrics.records, run / "loss.png", cfg.method)))
    say(progress, summary_line(summary))
    say(progress, f"run folder: {run} (summary.json, metrics.jsonl, predictions.jsonl, loss.png, adapter/)")
    return summary


def with_answer_tokens(encoded: list, max_len: int) -> tuple[list, int]:
    """The examples that keep at least one answer token after the cut at max_len, and how many did not
    (a step of only such examples has no loss: it would log 0 and divide by zero later)."""
    kept = [ex for ex in encoded if any(t != -100 for t in ex[1])]
    if not kept:
        raise ValueError(f"--max-len {max_len}: no training example keeps an answer token (the prompts fill the "
                         "whole length); raise --max-len")
    return kept, len(encoded) - len(kept)


# Config fields of a schedule that must end with the run (AdaLoRA's budget: PEFT's name `total_step`;
# SpIEL's drop fraction: `total_steps`). Unless --set gives one, it is the run's number of optimiser steps.
RUN_LENGTH_FIELDS = ("total_step", "total_steps")


def with_run_length(method: str, method_args: dict, total_steps: int) -> dict:
    """method_args plus the run's step count for each RUN_LENGTH_FIELDS field the method has and the
    arguments leave unset (a schedule written for 1000 steps would not finish in a 125-step run)."""
    fields = {f.name for f in dataclasses.fields(method_module(method)[1])}
    return {**{name: total_steps for name in RUN_LENGTH_FIELDS if name in fields}, **method_args}


def prepare_model(model: Llama, cfg: TrainConfig, total_steps: int, device: torch.device, world: World | None = None):
    """Apply the method, make its tensors fp32, (FSDP) shard the model, and build AdamW (the method's
    parameter groups, the shards under FSDP) with the warmup + cosine schedule. The adapter's random
    initialisation is seeded here, so it does not depend on what consumed random numbers before (e.g. a
    base pretrained in the same process)."""
    world = world or World()
    torch.manual_seed(cfg.seed)
    args = with_run_length(cfg.method, cfg.method_args, total_steps)
    world.apply_method(model, lambda: apply_method(model, cfg.method, **args))  # refuses what cannot shard
    for p in model.parameters():  # trainable tensors are fp32 master weights, even on a bf16 base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.grad_checkpoint = cfg.grad_checkpoint
    world.shard(model)  # FSDP2, after the base is frozen and the method marked trainable (torchtune's order)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, fused=device.type == "cuda")
    warmup = round(cfg.warmup * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total_steps, cfg.min_lr_ratio))
    return opt, sched


def training_loop(model, forward, opt, sched, plan: DataPlan, cfg: TrainConfig, run: Path, metrics: Metrics,
                  device: torch.device, start: int, evaluate_loss, progress: bool, world: World | None = None) -> None:
    """Steps start..total: log every step, evaluate at epoch ends and every cfg.eval_every steps, save
    every cfg.save_every steps (default: at every evaluation) and at the end."""
    world = world or World()
    model.train()
    save_every = cfg.save_every or cfg.eval_every or plan.steps_per_epoch
    bar = progress_bar(progress, plan.total_steps, start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start, step = time.time(), start
    try:
        for step in range(start, plan.total_steps):
            t0 = time.time()
            bits, tokens, n_answer, gnorm = train_step(model, forward, opt, plan.step_batches(step), cfg.clip, device,
                                                       step=step + 1, world=world)
            lr = opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0)
            sched.step()
            dt, done, epoch = time.time() - t0, step + 1, plan.epoch_of(step)
            metrics.log(kind="train", step=done, epoch=epoch, loss_bpt=bits, lr=lr, grad_norm=gnorm, tokens=tokens,
                        answer_tokens=n_answer, tokens_per_s=tokens / dt, peak_mem_gib=peak_memory(device),
                        elapsed_s=time.time() - t_start)
            bar.update(1)
            bar.set_postfix(loss=f"{bits:.3f}b", tok_s=f"{tokens / dt:,.0f}", lr=f"{lr:.2e}")
            epoch_end = done % plan.steps_per_epoch == 0
            if epoch_end or (cfg.eval_every and done % cfg.eval_every == 0):
                line = evaluate_loss(done, epoch, epoch_end)
                if progress:
                    bar.write(line)
            if done % save_every == 0 or done == plan.total_steps:
                save_checkpoint(run, model, opt, sched, done, world)
    except Diverged as e:
        metrics.log(kind="stopped", step=step + 1, reason=str(e))
        world.on_main(lambda: plot_losses(metrics.records, run / "loss.png", cfg.method))
        raise Diverged(f"step {step + 1}: {e}. Training stopped; the last good adapter (step {saved_step(run)}) "
                       f"is kept in {run / 'adapter'}. Try a lower --lr (now {cfg.lr}).") from None
    finally:
        bar.close()
    if start == plan.total_steps:  # resumed a finished run: still leave a complete run folder
        save_checkpoint(run, model, opt, sched, start, world)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    run, world = None, World()
    try:
        if args.list_methods or args.method_args == ["help"]:
            names = list(METHODS) if args.list_methods else [args.method]
            print("\n".join(describe_method(m) for m in names))
            return 0
        world = World.join(args.device)  # torchrun (WORLD_SIZE > 1): one process group, never N copies
        if args.resume:
            run = Path(args.resume).expanduser()
            cfg = resume_config(run, args.device)
            check_resume_flags(given_settings(argv), cfg, run)
            if not (run / STATE_FILE).exists():
                raise FileNotFoundError(f"{run}: no {STATE_FILE} yet (the run never reached a save point); "
                                        f"start it again with --overwrite")
            train(cfg, resume=True, progress=not args.quiet, world=world)
        else:
            cfg = config_from_args(args)
            check_config(cfg)
            run = Path(cfg.out).expanduser()
            world.on_main(lambda: prepare_run_folder(run, args.overwrite))
            train(cfg, progress=not args.quiet, world=world)
        world.leave(done=True)
    except (Diverged, ValueError, KeyError, OSError, NotImplementedError) as e:
        print(f"error: {'' if world.main else f'(rank {world.rank} of {world.size}) '}{e}", file=sys.stderr)
        world.leave(done=isinstance(e, Diverged))  # from the global loss: every rank stops at the same step
        return 1
    except KeyboardInterrupt:
        if world.main:
            step = saved_step_or_none(run)
            print("\ninterrupted. " + (f"The last save is step {step}; continue with: {resume_command(run, world)}"
                                         if step else "No save point was reached; start over with --overwrite."),
                  file=sys.stderr)
        return 130
    except RuntimeError as e:  # under torchrun: a rank died or hung, and a collective failed
        why = failure_message(e) if world.size > 1 else None
        if why is None:
            raise
        step = saved_step_or_none(run)
        print(f"error: rank {world.rank} of {world.size}: {why}. " +
              (f"The last save is step {step}; continue with: {resume_command(run, world)}" if step else
               "No save point was reached; start over with --overwrite."), file=sys.stderr)
        return 1
    finally:
        world.leave()
    return 0


def resume_command(run: Path | None, world: World) -> str:
    """The command that continues `run` with as many processes as it had."""
    if world.size == 1:
        return f"make resume RUN={run} (or .venv/bin/python -m minipeft.finetune --resume {run})"
    return (f".venv/bin/python -m torch.distributed.run --standalone --nproc-per-node {world.size} "
            f"-m minipeft.finetune --resume {run}")


if __name__ == "__main__":
    sys.exit(main())
