"""The paper's cycle: train a predictor with its Epistemic Head on real data, then fine-tune it while
generating Longtail-Guided data on a schedule, each round guided by the predictor as it is then.

    pretrain on real images                                          --pretrain-epochs
    for each fine-tuning epoch e:                                    --epochs
        if e opens a generation round:                               --gen-epochs, --synthetic
            generate the round's images with Algorithm 1 (ltg.py), guided by the predictor now
        train one epoch on the real images and every synthetic image so far
        evaluate, record, checkpoint

    python train_loop.py                                  # embedded default: 8x8 digits, CPU, about a minute
    python train_loop.py --dataset flowers                # the paper's setup: Flowers102, ResNet-50, SD 1.4
    torchrun --nproc_per_node 8 train_loop.py --dataset flowers
    python train_loop.py --resume runs/digits-w0.07-x6-seed0            # continue a killed run
    python train_loop.py --init-from runs/digits-w0.07-x6-seed0/pretrained.pt --guidance-weight 0
    python train_loop.py --dataset flowers --refined-prompts prompts.json          # introspect.py's prompts
    python train_loop.py --dataset flowers --introspect-after 0 --vlm-url URL --llm-url URL   # automatic

run_folder.py describes the run folder; its synthetic/ folder is a dataset (Hugging Face imagefolder,
torchvision ImageFolder) with a dataset card. Every file is written whole, so `--resume` after a kill
at any moment ends with the same metrics as an uninterrupted run.
"""

import argparse
import copy
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import introspect
import livt
import ltg
import tasks
from run_folder import (RunFolder, RunFolderError, check_generated_data, checkpoint_bytes, dataset_card,
                        generated_rows, metadata_rows, plot_accuracy, plot_round, read_checkpoint, read_json,
                        read_metadata, remove_temporary_files, run_finished, take_lock, write_atomic, write_json,
                        write_jsonl, write_png)


# Flags left unset take these per-dataset values: the paper's for its datasets; for digits, values
# that fit the whole cycle in a minute or two on 2 CPU cores.
RESNET = dict(lr=1e-3, loss="ce", smoothing=0.0, mixup=False, augment="paper", optimizer="adam", drop_path=0.0)
PAPER = RESNET | dict(arch="resnet50", pretrain_epochs=100, epochs=100, batch_size=64, synthetic=20.0, steps=50,
                      guidance_scale=7.5, guidance_weight=0.1, gen_batch=8, workers=8,
                      diffusion="CompVis/stable-diffusion-v1-4")
# ImageNet-LT: LiVT's recipe (livt.py): an MAE-pretrained ViT-B/16 (--init-from), balanced BCE, AdamW with layer
# decay, RandAugment, mixup/cutmix; lr 8e-3 is LiVT's 1e-3 x global batch 2048 / 256 (256 per GPU on 8 GPUs).
LIVT = dict(arch="vit_base_patch16_224", batch_size=256, lr=8e-3, loss="bal-bce", smoothing=0.1, mixup=True,
            augment="randaugment", optimizer="adamw", drop_path=0.1)
DEFAULTS = {
    "digits": RESNET | dict(arch="cnn", pretrain_epochs=30, epochs=10, batch_size=16, synthetic=6.0, steps=20,
                            guidance_scale=2.0, guidance_weight=0.07, gen_batch=512, workers=0,
                            diffusion=str(tasks.DIGITS_UNET)),
    "flowers": PAPER, "cars": PAPER, "caltech101": PAPER, "imagenet-lt": PAPER | LIVT,
    "pets": PAPER | dict(synthetic=30.0),
}
# What --resume may change: where things are and how fast they run, never what the run computes.
CHANGEABLE_ON_RESUME = ("threads", "workers", "device", "download", "data_root", "vlm_url", "llm_url")
# What a run's pretraining depends on: --init-from takes these from the checkpoint it starts from.
PRETRAINING = ("dataset", "arch", "head", "head_samples", "pretrain_epochs", "batch_size", "lr", "seed", "input_size",
               "loss", "smoothing", "mixup", "augment", "optimizer", "weight_decay", "layer_decay", "warmup_epochs",
               "min_lr", "drop_path")


class RunError(Exception):
    """A run that cannot go on; the message is one line, meant for the user (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# The cycle.
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        run_cycle(args)
    except (RunError, RunFolderError, tasks.TaskError, introspect.IntrospectError, livt.CheckpointMismatch) as e:
        print(f"train_loop.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        resume = f"; continue with --resume {args.out}" if args.out and RunFolder(args.out).config.exists() else ""
        print(f"train_loop.py: interrupted{resume}", file=sys.stderr)
        sys.exit(130)


def run_cycle(args):
    run = open_run(args)
    with tqdm(desc="epochs", disable=run.rank != 0, initial=run.start, total=len(run.epochs)) as bar:
        for epoch in run.epochs[run.start:]:
            if epoch.number == 0 or epoch.index == run.start:
                start_phase(run, epoch)
            if epoch.phase == "finetune" and epoch.number in args.rounds:
                generation_round(run, args.rounds.index(epoch.number), epoch)
            dataset = training_set(run, epoch)
            loss, lr = train_epoch(run, epoch, dataset)
            record_epoch(run, epoch, loss, lr, synthetic=len(dataset) - len(run.task.train))
            if run.rank == 0:
                bar.set_postfix(loss=f"{loss:.3f}", **accuracies(run.metrics), refresh=False)
            bar.update()
    close_run(run)


class Epoch(NamedTuple):
    index: int      # over the whole run: pretraining epochs, then fine-tuning epochs
    phase: str      # "pretrain" (real only) or "finetune" (real + synthetic)
    number: int     # within the phase
    length: int     # epochs in the phase (the cosine schedule's period)


@dataclass
class Run:
    args: argparse.Namespace
    task: tasks.Task
    head: ltg.EpistemicHead
    learner: nn.Module            # the head in a Learner, in DistributedDataParallel under torchrun
    diffusion: tuple | None
    folder: RunFolder
    rank: int
    world: int
    device: torch.device
    epochs: list
    sizes: list                   # images per generation round
    metrics: dict
    state: dict | None            # the checkpoint the run starts from
    mixup: object = None          # LiVT's mixup/cutmix of each batch (timm), or None
    start: int = 0                # the first epoch still to train
    optimizer: torch.optim.Optimizer = None
    schedule: torch.optim.lr_scheduler.LRScheduler = None
    lock: object = field(default=None, repr=False)


def open_run(args):
    """Everything the cycle needs, checked before the run folder is touched: data, models, the starting
    checkpoint, the plan; then the folder (locked, cleaned, checked) and the state to continue from."""
    rank, world, device = init_distributed(args.device)
    torch.set_num_threads(args.threads)
    task = tasks.load_task(args)
    check_prompt_file(args, task)
    torch.manual_seed(args.seed)
    C = len(task.classes)
    head = tasks.build_head(args, C, 1 if task.mode == "L" else 3).to(device)
    diffusion = tasks.load_diffusion(args, device) if args.rounds else None
    folder = RunFolder(args.out)
    state = start_state(args, folder, head, C, device)
    epochs = [Epoch(e, "pretrain", e, args.pretrain_epochs) for e in range(args.pretrain_epochs)]
    epochs += [Epoch(args.pretrain_epochs + e, "finetune", e, args.epochs) for e in range(args.epochs)]
    budget = round(args.synthetic * len(task.train))
    learner = tasks.Learner(head, tasks.predictor_loss(args, task.train_labels, C)).to(device)
    if world > 1:
        learner = DistributedDataParallel(learner, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(args, task, head, learner, diffusion, folder, rank, world, device, epochs,
              round_sizes(budget, len(args.rounds)) if args.rounds else [], new_metrics(args.dataset, task, budget), state,
              livt.mixup(C, args.smoothing) if args.mixup else None)
    if state is not None:
        head.load_state_dict(state["head"])
        run.metrics |= {k: state["metrics"][k] for k in ("epochs", "rounds")}
        run.start = state["epoch"] + 1
    on_rank0(run, lambda: check_folder(run))
    on_rank0(run, lambda: print_plan(run))
    on_rank0(run, lambda: write_config(run))
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    return run


def start_phase(run, epoch):
    """A fresh optimiser and schedule for the phase (Adam and cosine, or LiVT's AdamW with layer-wise lr decay,
    warmup and cosine); a run resumed inside a phase restores both."""
    args = run.args
    if args.optimizer == "adamw":
        run.optimizer = livt.optimizer(run.learner, args.lr, args.weight_decay, args.layer_decay)
        run.schedule = livt.warmup_cosine(run.optimizer, epoch.length, args.warmup_epochs, args.min_lr)
    else:
        run.optimizer = torch.optim.Adam([p for p in run.learner.parameters() if p.requires_grad], lr=args.lr)
        run.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(run.optimizer, T_max=epoch.length)
    if epoch.number > 0:
        run.optimizer.load_state_dict(run.state["optimizer"])
        run.schedule.load_state_dict(run.state["schedule"])


def generation_round(run, rnd, epoch):
    """Round rnd: its images (each rank its share), a grid of them and the dataset card, introspection if
    asked for after this round, and the round's record."""
    args, folder = run.args, run.folder
    rows = generate_round(args, run.task, run.diffusion, run.head, folder, rnd, run.sizes[rnd], run.rank, run.world)
    if run.rank == 0:
        plot_round(folder, rows, run.task)
        write_card(run)
        if rnd == args.introspect_after:
            introspect.introspect_run(folder.root, vlm=args.vlm, vlm_url=args.vlm_url, llm=args.llm,
                                      llm_url=args.llm_url, class_names=run.task.classes)
    barrier(run.world)  # the refined prompts exist before any rank generates with them
    if len(run.metrics["rounds"]) == rnd:  # a resumed round is recorded once
        run.metrics["rounds"].append(dict(round=rnd, epoch=epoch.number, images=len(rows),
                                          mean_signal=float(np.mean([r["signal"] for r in rows])),
                                          guidance_ratio=float(np.mean([r["guidance_ratio"] for r in rows]))))


def training_set(run, epoch):
    """The real images, plus in fine-tuning every synthetic image of the rounds recorded so far."""
    if epoch.phase == "pretrain":
        return run.task.train
    rows = [r for r in read_metadata(run.folder.metadata) if r["round"] < len(run.metrics["rounds"])]
    synthetic = tasks.Images([run.folder.synthetic / r["file_name"] for r in rows], [r["label"] for r in rows],
                             run.task.train_tf, run.task.mode)
    return ConcatDataset([run.task.train, synthetic])


def train_epoch(run, epoch, dataset):
    """One epoch over `dataset` (sharded by rank); returns (the mean loss over all ranks, the epoch's lr).

    Its randomness (order, augmentation, epinet indices) is seeded from (seed, epoch, rank): a resumed
    run and every rank draw what an uninterrupted run would, with no RNG state to carry."""
    torch.manual_seed(derive_seed(run.args.seed, 1_000_000 + epoch.index, run.rank))
    sampler = DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=run.args.seed)
    sampler.set_epoch(epoch.index)
    loader = DataLoader(dataset, batch_size=run.args.batch_size, sampler=sampler, num_workers=run.args.workers,
                        drop_last=run.mixup is not None)  # mixup pairs a batch with itself reversed: even sizes only
    lr = run.schedule.get_last_lr()[0]
    run.learner.train()
    total = torch.zeros(2, dtype=torch.float64)                              # [sum of losses, images]
    for x, y in tqdm(loader, desc=f"{epoch.phase} {epoch.number}", disable=run.rank != 0, leave=False):
        x, y = x.to(run.device), y.to(run.device)
        if run.mixup is not None:
            x, y = run.mixup(x, y)                                           # y [B] -> class probabilities [B, C]
        loss = run.learner(x, y)
        tasks.fit_step(run.optimizer, loss)
        total += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(total)
    run.schedule.step()
    return (total[0] / total[1]).item(), lr


def record_epoch(run, epoch, loss, lr, synthetic):
    """Rank 0: the epoch's metrics, the checkpoint (and pretrained.pt at the end of pretraining), the plot."""
    if run.rank == 0:
        run.metrics["epochs"].append(dict(epoch=epoch.index, phase=epoch.phase, phase_epoch=epoch.number, lr=lr,
                                          loss=loss, real=len(run.task.train), synthetic=synthetic,
                                          **tasks.evaluation_metrics(run.head.predictor, run.task, run.metrics["class_groups"],
                                                          run.device, run.args.workers)))
        run.state = dict(epoch=epoch.index, num_classes=len(run.task.classes), head=run.head.state_dict(),
                         optimizer=run.optimizer.state_dict(), schedule=run.schedule.state_dict(),
                         metrics=run.metrics, config=saved_config(run.args))
        data = checkpoint_bytes(run.state)
        if epoch.index == run.args.pretrain_epochs - 1:  # before checkpoint.pt: a kill between the two redoes it
            write_atomic(run.folder.pretrained, data)
        write_atomic(run.folder.checkpoint, data)
        write_json(run.folder.metrics, run.metrics)
        plot_accuracy(run.folder.accuracy_plot, run.metrics)
    barrier(run.world)


def accuracies(metrics):
    """The last epoch's test top-1, overall and per group of classes, as text."""
    last = metrics["epochs"][-1] if metrics["epochs"] else {}
    keys = ("acc", *(f"{g}_acc" for g in metrics["class_groups"]))
    return {k.removesuffix("_acc"): f"{last[k]:.3f}" for k in keys if last.get(k) is not None}


def close_run(run):
    if run.rank == 0:
        print(f"done: test top-1 {', '.join(f'{k} {v}' for k, v in accuracies(run.metrics).items())}; "
              f"results in {run.folder.root}/ (metrics.json, accuracy.png, rounds/, synthetic/, checkpoint.pt)")
        run.lock.close()
    if run.world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Generation rounds: each rank makes its share of fixed batches, writes its rows to its own shard
# after each batch, and rank 0 merges the shards into synthetic/metadata.jsonl. A resumed round skips
# the batches already written; since batches and seeds are fixed, the images are the same as without
# the kill.
# ---------------------------------------------------------------------------------------------

def round_sizes(total, rounds):
    """Equal shares of the budget, the first rounds taking the remainder."""
    return [total // rounds + (r < total % rounds) for r in range(rounds)]


def image_prompt(task, refined, label, index):
    """The prompt of image `index` (class `label`): the class's refined prompts in turn, else its template;
    None for the class-conditional digits model."""
    name = task.classes[label]
    if name in refined:
        return refined[name][index // len(task.classes) % len(refined[name])]
    return task.prompt.format(name) if task.prompt else None


def round_prompts(args, task, folder, rnd):
    """{class name: refined prompts} that round `rnd` generates with ({} = the class templates)."""
    if args.refined_prompts:
        return introspect.load_refined_prompts(args.refined_prompts, task.classes)
    if args.introspect_after is not None and rnd > args.introspect_after:
        return introspect.load_refined_prompts(folder.introspection / "refined_prompts.json", task.classes)
    return {}


def sample_batch(args, task, diffusion, head, labels, prompts, seeds, guidance, steps=None):
    model, scheduler, guidance_decoder = diffusion
    kwargs = dict(preprocess=task.preprocess, num_inference_steps=steps or args.steps, progress=False)
    if task.prompt is None:
        return ltg.sample_class_conditional(model, scheduler, head, labels, seeds, guidance, args.guidance_scale, **kwargs)
    device = next(head.parameters()).device
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return ltg.sample_stable_diffusion(model, head, prompts, seeds, guidance, args.guidance_scale,
                                           guidance_decoder=guidance_decoder, **kwargs)


def generate_round(args, task, diffusion, head, folder, rnd, count, rank=0, world=1):
    """Round `rnd`: `count` images, class i % C for image i, guided by the predictor as it is now. Returns its rows."""
    done = {(r["round"], r["index"]) for r in generated_rows(folder)}
    mine = read_metadata(folder.shard(rank))
    batches = [range(s, min(s + args.gen_batch, count)) for s in range(0, count, args.gen_batch)]
    todo = [b for i, b in enumerate(batches) if i % world == rank and (rnd, b[0]) not in done]
    guidance = ltg.Guidance(w=args.guidance_weight, signal=args.signal, rescale=args.rescale, every=args.guide_every)
    refined = round_prompts(args, task, folder, rnd)
    for batch in tqdm(todo, desc=f"round {rnd}", disable=rank != 0, leave=False):
        labels = [i % len(task.classes) for i in batch]
        prompts = [image_prompt(task, refined, c, i) for c, i in zip(labels, batch)]
        seeds = [derive_seed(args.seed, rnd, i) for i in batch]
        out = sample_batch(args, task, diffusion, head, labels, prompts, seeds, guidance)
        rows = metadata_rows(out, task.classes, args.guidance_weight, rnd, batch, labels, prompts, seeds)
        for row, image in zip(rows, out.images):
            write_png(folder.synthetic / row["file_name"], image)
        mine += rows
        write_jsonl(folder.shard(rank), mine)  # after the batch's PNGs: a listed image is always on disk
    barrier(world)
    if rank == 0:
        write_jsonl(folder.metadata, generated_rows(folder))
        shutil.rmtree(folder.generation, ignore_errors=True)
    barrier(world)
    return [r for r in generated_rows(folder) if r["round"] == rnd]


def write_card(run):
    """synthetic/README.md, the dataset card, for the images generated so far."""
    args = run.args
    predictor = f"{args.arch} with an Epistemic Head ({args.head}, K = {args.head_samples}), trained by this run"
    card = dataset_card(read_metadata(run.folder.metadata), run.task.classes, saved_config(args), args.command,
                        args.diffusion, predictor)
    write_atomic(run.folder.card, card.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Opening a run: the models, the checkpoint it starts from, its plan, its folder.
# ---------------------------------------------------------------------------------------------

def check_prompt_file(args, task):
    if args.refined_prompts:
        try:
            introspect.load_refined_prompts(args.refined_prompts, task.classes)
        except introspect.IntrospectError as e:
            raise RunError(f"--refined-prompts: {e}") from None


def start_state(args, folder, head, num_classes, device):
    """The checkpoint the run continues from: its own when resuming, or --init-from's run; None to start from
    scratch, where --init-from's encoder weights (an MAE/LiVT checkpoint) are loaded into the predictor."""
    if args.resume and folder.checkpoint.exists():
        state = read_checkpoint(folder.checkpoint, device)
    elif args.init_from and is_run_checkpoint(args.init_from):
        state = read_checkpoint(args.init_from, device)
    else:
        if args.init_from:
            print(f"--init-from {args.init_from}: {livt.load_encoder(head.predictor, args.init_from)}", file=sys.stderr)
        return None
    if state["num_classes"] != num_classes:
        raise RunError(f"{folder.checkpoint if args.resume else args.init_from} has {state['num_classes']} classes "
                       f"but --dataset {args.dataset} has {num_classes}; use a checkpoint of the same dataset")
    return state


def new_metrics(dataset, task, budget):
    C = len(task.classes)
    return dict(dataset=dataset, classes=task.classes,
                class_groups=tasks.class_groups(task.train_labels, C, rarest_third=dataset == "digits"),
                class_group_rule=f"real training images: many-shot > {tasks.MANY_SHOT}, medium-shot {tasks.FEW_SHOT}-"
                                 f"{tasks.MANY_SHOT}, few-shot < {tasks.FEW_SHOT}; tail: the rarest third (digits only)",
                train_counts=np.bincount(task.train_labels, minlength=C).tolist(), synthetic_budget=budget,
                epochs=[], rounds=[])


def on_rank0(run, fn):
    """fn() on rank 0; its failure reaches every rank, so that none waits forever at the next barrier."""
    message = [None]
    if run.rank == 0:
        try:
            fn()
        except (RunError, RunFolderError) as e:
            message = [str(e)]
    if run.world > 1:
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise RunError(message[0])


def check_folder(run):
    """An existing run folder: hold its lock (a second process on it stops, naming the holder), clear the
    temporary files of interrupted writes, check the generated data against the recorded rounds."""
    if run.folder.root.is_dir():
        run.lock = run.lock or take_lock(run.folder)
        remove_temporary_files(run.folder.root)
        check_generated_data(run.folder, run.metrics["rounds"])


def write_config(run):
    """config.json, in a folder this process holds."""
    run.lock = run.lock or take_lock(run.folder)
    write_json(run.folder.config, saved_config(run.args))


def print_plan(run):
    """The work ahead and its estimated time on this device; without a GPU a paper dataset stops here
    unless --device cpu was given."""
    args, remaining = run.args, run.epochs[run.start:]
    rounds = [(r, e) for r, e in enumerate(args.rounds) if r >= len(run.metrics["rounds"])]
    images = sum(run.sizes[r] for r, _ in rounds)
    gen, train = estimate_seconds(run)
    trained = sum(len(run.task.train) + sum(run.sizes[r] for r, e in enumerate(args.rounds) if e <= ep.number)
                  * (ep.phase == "finetune") for ep in remaining)
    total = (images * gen + trained * train) / run.world
    print(f"plan: {args.dataset}, {len(run.task.classes)} classes, {len(run.task.train)} real training images; "
          f"{sum(e.phase == 'pretrain' for e in remaining)} pretraining and "
          f"{sum(e.phase == 'finetune' for e in remaining)} fine-tuning epochs to go; generation rounds at fine-tuning "
          f"epochs {[e for _, e in rounds]} with {[run.sizes[r] for r, _ in rounds]} images (w {args.guidance_weight:g}, "
          f"{args.steps} steps, {args.diffusion})\n"
          f"estimate on {run.device.type} x {run.world}: {duration(total)} (generation {duration(images * gen / run.world)}, "
          f"training {duration(trained * train / run.world)}; from one timed step of each, evaluation not counted)",
          file=sys.stderr)
    if run.device.type == "cpu" and args.device == "auto" and args.dataset != "digits":
        raise RunError(f"no GPU here: this run would take about {duration(total)} on the CPU; "
                       "pass --device cpu to run it anyway")


def duration(seconds):
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def estimate_seconds(run):
    """(seconds per generated image, seconds per trained image): one timed step after a warm-up, at batch 1
    (times the step count for an image), or at the full batch where batch 1 is quick."""
    step = 0.0
    if run.diffusion is not None:
        step = time_call(lambda: generate_for_timing(run, 1))
        if step < 0.5:  # quick enough to time the full batch too, where batching pays
            n = min(run.args.gen_batch, max(run.sizes))
            step = time_call(lambda: generate_for_timing(run, n)) / n
    learner = copy.deepcopy(run.learner.module if run.world > 1 else run.learner).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=run.args.lr)
    x, y = next(iter(DataLoader(run.task.train, batch_size=run.args.batch_size, num_workers=run.args.workers)))
    x, y = x.to(run.device), y.to(run.device)
    return step * run.args.steps, time_call(lambda: tasks.fit_step(optimizer, learner(x, y))) / len(y)


def time_call(fn):
    """Seconds of fn()'s second call (the first warms up)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def generate_for_timing(run, n):
    guidance = ltg.Guidance(w=run.args.guidance_weight, signal=run.args.signal, rescale=run.args.rescale)
    prompts = [image_prompt(run.task, {}, 0, 0)] * n
    sample_batch(run.args, run.task, run.diffusion, run.head, [0] * n, prompts, list(range(n)), guidance, steps=1)


def init_distributed(device_flag):
    """(rank, world size, device): one process without torchrun, a process group under torchrun."""
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def barrier(world):
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Flags. Bad values stop the run before anything is read or written: one line, exit code 2.
# ---------------------------------------------------------------------------------------------

def per_dataset(key):
    return "(default: per dataset; digits %s, paper datasets %s)" % (DEFAULTS["digits"][key], PAPER[key])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None (per-dataset defaults are in the help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's exit code 2, as one line: every bad value is named with what is accepted."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_parser():
    p = Parser(prog="train_loop.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=tasks.DATASETS, default="digits",
                   help="digits runs offline on a CPU; the others are the paper's (torchvision loaders)")
    g.add_argument("--data-root", default="data", help="where the datasets live")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch a torchvision dataset missing from --data-root; --no-download refuses (offline machines)")
    g.add_argument("--eval-set", action="append", default=[], metavar="NAME=DIR",
                   help="imagenet-lt only: an evaluation-only ImageFolder (ImageNet-V2: folders 0..999; "
                        "ImageNet-A: WordNet-id folders); repeatable")
    g = p.add_argument_group("predictor")
    g.add_argument("--arch", help="'cnn' (small CNN), a torchvision classifier or a timm ViT, by name "
                                  + per_dataset("arch"))
    g.add_argument("--head", choices=ltg.HEADS, default="epinet", help="the Epistemic Head")
    g.add_argument("--head-samples", type=int, default=16, help="K predictions per input")
    g.add_argument("--init-from", metavar="CHECKPOINT",
                   help="a run's pretrained.pt: start after its pretraining, with its pretraining flags and history "
                        "(e.g. arms of a comparison); or an MAE/LiVT checkpoint: the ViT encoder's initial weights")
    g = p.add_argument_group("training")
    g.add_argument("--pretrain-epochs", type=int, help="epochs on real data only, from scratch " + per_dataset("pretrain_epochs"))
    g.add_argument("--epochs", type=int, help="fine-tuning epochs, real + synthetic " + per_dataset("epochs"))
    g.add_argument("--batch-size", type=int, help=per_dataset("batch_size"))
    g.add_argument("--lr", type=float, help="peak learning rate of each phase " + per_dataset("lr"))
    g.add_argument("--seed", type=int, default=0, help="everything random in the run derives from it")
    add_recipe_flags(p)
    add_generation_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default: runs/<dataset>-w<w>-x<synthetic>-seed<seed>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved flags")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if there is one; a paper dataset without a GPU stops after its plan "
                        "unless --device cpu")
    g.add_argument("--threads", type=int, default=2, help="CPU threads, fixed so reruns are bit-identical")
    g.add_argument("--workers", type=int, help="DataLoader workers " + per_dataset("workers"))
    return p


def add_recipe_flags(p):
    g = p.add_argument_group("recipe (imagenet-lt: LiVT's, see livt.py)")
    g.add_argument("--input-size", type=int, default=224, help="side of the predictor's square input")
    g.add_argument("--loss", choices=("ce", "bal-bce"), help="the predictor's loss: cross entropy, or LiVT's "
                   "balanced BCE (logits shifted by the log prior odds) " + per_dataset("loss"))
    g.add_argument("--smoothing", type=float, help="label smoothing " + per_dataset("smoothing"))
    g.add_argument("--mixup", action=argparse.BooleanOptionalAction,
                   help="mixup 0.8 / cutmix 1.0 on every batch, LiVT's (needs an even --batch-size) " + per_dataset("mixup"))
    g.add_argument("--augment", choices=("paper", "randaugment"), help="RGB augmentation: the paper's (rotation 15, "
                   "crops, flips) or LiVT's (RandAugment m9, random erasing 0.25) " + per_dataset("augment"))
    g.add_argument("--optimizer", choices=("adam", "adamw"), help="adam: Adam, cosine over each phase; adamw: LiVT's "
                   "AdamW with layer-wise lr decay, warmup then cosine " + per_dataset("optimizer"))
    g.add_argument("--weight-decay", type=float, default=0.05, help="adamw only")
    g.add_argument("--layer-decay", type=float, default=0.75, help="adamw only: lr scale per ViT block from the top")
    g.add_argument("--warmup-epochs", type=int, default=5, help="adamw only: linear warmup at the start of each phase")
    g.add_argument("--min-lr", type=float, default=1e-6, help="adamw only: where the cosine ends")
    g.add_argument("--drop-path", type=float, help="stochastic depth of a ViT " + per_dataset("drop_path"))


def add_generation_flags(p):
    g = p.add_argument_group("generation")
    g.add_argument("--diffusion", help="diffusers folder or hub id " + per_dataset("diffusion"))
    g.add_argument("--synthetic", type=float,
                   help="synthetic budget as a multiple of the real training set; 0 = real-only baseline "
                        "(default: 20, pets 30, digits %s)" % DEFAULTS["digits"]["synthetic"])
    g.add_argument("--gen-epochs", help="fine-tuning epochs that start with a generation round, comma-separated; "
                                        "equal shares of the budget (default: every 5 epochs from 0)")
    g.add_argument("--steps", type=int, help="DDIM steps " + per_dataset("steps"))
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance " + per_dataset("guidance_scale"))
    g.add_argument("--gen-batch", type=int, help="images per generation batch " + per_dataset("gen_batch"))
    g = p.add_argument_group("guidance (Algorithm 1)")
    g.add_argument("--guidance-weight", type=float, help="w of Eqn 11; 0 = unguided synthetic baseline " + per_dataset("guidance_weight"))
    g.add_argument("--signal", choices=ltg.SIGNALS, default="total", help="the longtail signal (Eqn 4)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True,
                   help="w is the guidance term's share of |eps| at every step (ltg.Guidance); --no-rescale: w "
                        "multiplies the raw gradient as in Eqn 11")
    g.add_argument("--guide-every", type=int, default=1,
                   help="guide every k-th DDIM step (ltg.Guidance(every=k)); 2 about halves guidance's cost")
    g.add_argument("--guidance-decoder", metavar="PATH_OR_ID",
                   help="a cheaper VAE decoder for the guidance pass only, e.g. madebyollin/taesd (a diffusers "
                        "AutoencoderTiny); Stable Diffusion only")
    g = p.add_argument_group("introspection (introspect.py)")
    g.add_argument("--refined-prompts", metavar="FILE",
                   help="JSON {class name: [prompt, ...]} (introspect.py summarise writes it): generate with these "
                        "prompts instead of the class template; classes absent from the file keep the template")
    g.add_argument("--introspect-after", type=int, metavar="ROUND",
                   help="after generation round ROUND, describe the run's hardest images with a VLM, summarise them "
                        "into refined prompts with an LLM and generate the later rounds with them")
    g.add_argument("--vlm", metavar="PATH_OR_ID", help="--introspect-after: a LLaVA-NeXT model (transformers)")
    g.add_argument("--vlm-url", metavar="URL", help="--introspect-after: an OpenAI-compatible endpoint for describing")
    g.add_argument("--llm", metavar="PATH_OR_ID", help="--introspect-after: a chat causal LM (transformers)")
    g.add_argument("--llm-url", metavar="URL", help="--introspect-after: an OpenAI-compatible endpoint for summarising")


_UNSET = object()


def given_flags(argv):
    """The flags (dests) on the command line, told apart from defaults."""
    probe = get_parser()
    probe.set_defaults(**{a.dest: _UNSET for a in probe._actions})
    return {k for k, v in vars(probe.parse_args(argv)).items() if v is not _UNSET}


def inherit(parser, argv, saved, refused, source):
    """The flags with `saved` values as defaults; a flag in `refused` given with another value is refused."""
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    for key in sorted(given_flags(argv) & set(refused) & saved.keys()):
        if getattr(args, key) != saved[key]:
            flag = "--" + key.replace("_", "-")
            parser.error(f"{flag} {getattr(args, key)}: {source} has {flag} {saved[key]}; "
                         f"drop {flag} (a run keeps the flags that decide its results)")
    return args


def parse_args(argv=None):
    """The run's flags (parse_flags) and where it goes (--out)."""
    parser, args = parse_flags(argv)
    check_out(parser, args)
    return args


def parse_flags(argv=None):
    """(parser, flags): a resumed run's saved flags, or an --init-from run's pretraining flags, as defaults;
    per-dataset defaults for what is still unset; every value checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:
        saved = saved_flags(parser, RunFolder(args.resume).config, "--resume")
        args = inherit(parser, argv, saved, set(saved) - set(CHANGEABLE_ON_RESUME), f"the run in {args.resume}")
        args.out = args.resume
    elif args.init_from:
        state = run_init_checkpoint(parser, args.init_from)
        if state is not None:
            pretraining = {k: v for k, v in state["config"].items() if k in PRETRAINING}
            args = inherit(parser, argv, pretraining, PRETRAINING, f"--init-from {args.init_from}")
    args.command = getattr(args, "command", None) or shlex.join(["python", "train_loop.py", *argv])
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(parser, args)
    return parser, args


def saved_flags(parser, path, flag):
    if not path.is_file():
        parser.error(f"{flag} {path.parent}: no run there ({path} is missing)")
    try:
        return read_json(path)
    except RunFolderError as e:
        parser.error(f"{flag} {path.parent}: {e}; restore it or start a new run")


def is_run_checkpoint(path):
    try:
        read_checkpoint(path)
        return True
    except RunFolderError:
        return False


def run_init_checkpoint(parser, path):
    """--init-from's checkpoint if it is a run's, at the end of its pretraining; None for weights (an MAE/LiVT
    checkpoint: checked against the predictor when the run opens)."""
    if not Path(path).is_file():
        parser.error(f"--init-from {path}: no such file (expected a run's pretrained.pt or an MAE checkpoint)")
    if not is_run_checkpoint(path):
        return None
    state = read_checkpoint(path)
    if state["epoch"] != state["config"]["pretrain_epochs"] - 1:
        parser.error(f"--init-from {path}: saved after epoch {state['epoch']}, not at the end of pretraining "
                     f"(epoch {state['config']['pretrain_epochs'] - 1}); use the run's pretrained.pt")
    return state


def check_args(parser, args):
    """Refuse bad values before anything is read or written."""
    if not (math.isfinite(args.guidance_weight) and args.guidance_weight >= 0):
        parser.error(f"--guidance-weight {args.guidance_weight}: must be finite and >= 0 (0 = unguided synthetic)")
    if not (math.isfinite(args.synthetic) and args.synthetic >= 0):
        parser.error(f"--synthetic {args.synthetic}: must be >= 0 (0 = real-only baseline)")
    for flag in ("epochs", "batch_size", "steps", "gen_batch", "head_samples", "threads", "guide_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    for flag in ("pretrain_epochs", "workers"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if not tasks.is_architecture(args.arch):
        parser.error(f"--arch {args.arch}: unknown; use 'cnn', a torchvision classifier such as resnet50 "
                     f"(torchvision.models.list_models(module=torchvision.models)) or a timm ViT such as "
                     f"vit_base_patch16_224")
    if args.dataset == "digits" and (args.arch != "cnn" or args.augment != "paper" or args.mixup):
        parser.error("--arch, --augment and --mixup choose how an RGB predictor trains; the digits predictor is "
                     "--arch cnn on 8x8 greyscale images")
    if args.mixup and args.batch_size % 2:
        parser.error(f"--batch-size {args.batch_size}: mixup pairs each batch with itself reversed; use an even size")
    if args.eval_set and args.dataset != "imagenet-lt":
        parser.error(f"--eval-set is for --dataset imagenet-lt (ImageNet-V2, ImageNet-A), not {args.dataset}")
    for spec in args.eval_set:
        if "=" not in spec:
            parser.error(f"--eval-set {spec}: expected NAME=DIR, e.g. imagenet-v2=/data/imagenetv2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible here; use --device cpu (or auto)")
    args.rounds = generation_epochs(parser, args)
    check_introspection_args(parser, args)


def check_out(parser, args):
    """--out: a folder (or a place for one) holding no other run; by default the next free runs/... name."""
    if args.out is None:
        args.out = str(default_out(parser, args))
    elif Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a file; name a folder for the run")
    elif not args.resume and RunFolder(args.out).config.exists():
        parser.error(f"--out {args.out} already holds a run: continue it with --resume {args.out} or pick another --out")


def default_out(parser, args):
    """runs/<dataset>-w<w>-x<budget>-seed<seed>, with a -2, -3, ... suffix when that run is finished; an
    unfinished one is to be continued, not silently duplicated."""
    base = Path("runs") / f"{args.dataset}-w{args.guidance_weight:g}-x{args.synthetic:g}-seed{args.seed}"
    out, n = base, 1
    while RunFolder(out).config.exists():
        try:
            finished = run_finished(out)
        except RunFolderError as e:
            parser.error(f"{out}: {e}; continue it with --resume {out} once repaired, or pass --out")
        if not finished:
            parser.error(f"{out} holds an unfinished run with these flags: continue it with --resume {out}, "
                         "or pass --out to start another")
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def saved_config(args):
    """config.json: the flags and the command that started the run, without where it is (--out, --resume) and
    what follows from the flags."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "resume", "rounds")}


def check_introspection_args(parser, args):
    """Refined prompts need a text-conditioned generator, and the automatic mode a describer, a writer and
    a later round to use what they write."""
    if args.guidance_decoder and args.dataset == "digits":
        parser.error("--guidance-decoder is for Stable Diffusion (a paper dataset); the digits model decodes nothing")
    wants = args.refined_prompts or args.introspect_after is not None
    if wants and args.dataset == "digits":
        parser.error("--refined-prompts/--introspect-after need a text-conditioned --diffusion (a paper dataset); "
                     "the digits model is class-conditional")
    if args.refined_prompts and args.introspect_after is not None:
        parser.error("--refined-prompts and --introspect-after are exclusive: pick a prompt file or the automatic mode")
    if args.introspect_after is None:
        return
    last = len(args.rounds) - 2
    if not 0 <= args.introspect_after <= last:
        parser.error(f"--introspect-after {args.introspect_after}: must be a round with a later round to use its "
                     f"prompts, 0..{last} (rounds start at epochs {args.rounds})" if last >= 0 else
                     f"--introspect-after {args.introspect_after}: needs at least two generation rounds "
                     f"(--gen-epochs gives {len(args.rounds)})")
    for kind in ("vlm", "llm"):
        try:
            introspect.check_backend(kind, getattr(args, kind), getattr(args, f"{kind}_url"))
        except introspect.IntrospectError as e:
            parser.error(f"--introspect-after: {e}")


def generation_epochs(parser, args):
    """The fine-tuning epochs that open a generation round, sorted."""
    if args.gen_epochs is None:
        return list(range(0, args.epochs, 5)) if args.synthetic > 0 else []
    try:
        epochs = sorted({int(e) for e in args.gen_epochs.split(",") if e.strip()})
    except ValueError:
        parser.error(f"--gen-epochs {args.gen_epochs!r}: expected comma-separated epoch numbers, e.g. 0,5,10")
    if args.synthetic == 0:
        parser.error(f"--gen-epochs {args.gen_epochs!r} with --synthetic 0: a zero budget has no rounds "
                     "(drop --gen-epochs for the real-only baseline)")
    if not epochs:
        parser.error(f"--gen-epochs {args.gen_epochs!r}: empty schedule; give at least one epoch in 0..{args.epochs - 1}")
    if epochs[0] < 0 or epochs[-1] >= args.epochs:
        parser.error(f"--gen-epochs {args.gen_epochs!r}: epochs must lie in 0..{args.epochs - 1} (--epochs {args.epochs})")
    return epochs


def derive_seed(*keys):
    """A seed that is a pure function of its integer keys, e.g. (run seed, round, index)."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


if __name__ == "__main__":
    main()
