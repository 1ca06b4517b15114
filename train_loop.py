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

The flags and their checks are in train_flags.py, the data, predictors and generators in tasks.py,
the run folder in run_folder.py: its synthetic/ folder is a dataset (Hugging Face imagefolder,
torchvision ImageFolder) with a dataset card. Every file is written whole, so `--resume` after a kill
at any moment ends with the same metrics as an uninterrupted run.
"""

import argparse
import copy
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
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
import train_flags
from run_folder import (RunFolder, RunFolderError, check_generated_data, checkpoint_bytes, dataset_card,
                        generated_rows, metadata_rows, plot_accuracy, plot_round, read_checkpoint, read_metadata,
                        read_run_checkpoint, remove_temporary_files, take_lock, write_atomic, write_json, write_jsonl,
                        write_png)


class RunError(Exception):
    """A run that cannot go on; the message is one line, meant for the user (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# The cycle.
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = train_flags.parse_args(argv)
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
    if diffusion is not None and task.prompt is not None:
        train_flags.take_family_defaults(args, diffusion[0])
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
        run.metrics |= {k: state["metrics"][k] for k in ("epochs", "rounds", "class_groups")}
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
    rows = [r for r in read_metadata(run.folder.metadata) if r["round"] < len(run.metrics["rounds"]) and kept(run.args, r)]
    synthetic = tasks.Images([run.folder.synthetic / r["file_name"] for r in rows], [r["label"] for r in rows],
                             run.task.train_tf, run.task.mode)
    return ConcatDataset([run.task.train, synthetic])


def kept(args, row):
    """Whether a synthetic image is trained on: with --label-filter, only if the judge's or its round predictor's
    top-1 is the class asked for."""
    column = dict(judge="judge_label", predictor="predicted_label").get(args.label_filter)
    return column is None or row[column] == row["label"]


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
        accuracy = tasks.evaluation_metrics(run.head.predictor, run.task, run.metrics["class_groups"], run.device,
                                            run.args.workers)
        run.metrics["epochs"].append(dict(epoch=epoch.index, phase=epoch.phase, phase_epoch=epoch.number, lr=lr,
                                          loss=loss, real=len(run.task.train), synthetic=synthetic, **accuracy))
        if epoch.index == run.args.pretrain_epochs - 1 and run.task.val is not None:
            run.metrics["class_groups"]["hard"] = tasks.weakest_classes(accuracy["val_per_class_acc"])
        run.state = dict(epoch=epoch.index, num_classes=len(run.task.classes), head=run.head.state_dict(),
                         optimizer=run.optimizer.state_dict(), schedule=run.schedule.state_dict(),
                         metrics=run.metrics, config=train_flags.saved_config(run.args))
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


def derive_seed(*keys):
    """A seed that is a pure function of its integer keys, e.g. (run seed, round, index)."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


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


def round_guidance(args, guided=True):
    """How Algorithm 1 guides an image of a run (ltg.Guidance from the flags); w = 0 for the unguided share."""
    return ltg.Guidance(w=args.guidance_weight if guided else 0.0, signal=args.signal, rescale=args.rescale,
                        every=args.guide_every)


def sample_batch(args, task, diffusion, head, labels, prompts, seeds, guidance, steps=None):
    model, scheduler, guidance_decoder = diffusion
    kwargs = dict(preprocess=task.preprocess, num_inference_steps=steps or args.steps, progress=False)
    if task.prompt is None:
        return ltg.sample_class_conditional(model, scheduler, head, labels, seeds, guidance, args.guidance_scale, **kwargs)
    return ltg.sample_pipeline(model, head, prompts, seeds, guidance, args.guidance_scale,
                               guidance_decoder=guidance_decoder, resolution=args.resolution, **kwargs)


def generate_round(args, task, diffusion, head, folder, rnd, count, rank=0, world=1):
    """Round `rnd`: `count` images, class i % C for image i, guided by the predictor as it is now. Returns its rows."""
    done = {(r["round"], r["index"]) for r in generated_rows(folder)}
    mine = read_metadata(folder.shard(rank))
    unguided = round(args.unguided_share * count)  # images 0..unguided-1 of the round are made with w = 0
    batches = [range(s, min(s + args.gen_batch, end)) for start, end in ((0, unguided), (unguided, count))
               for s in range(start, end, args.gen_batch)]
    todo = [b for i, b in enumerate(batches) if i % world == rank and (rnd, b[0]) not in done]
    refined = round_prompts(args, task, folder, rnd)
    for batch in tqdm(todo, desc=f"round {rnd}", disable=rank != 0, leave=False):
        labels = [i % len(task.classes) for i in batch]
        prompts = [image_prompt(task, refined, c, i) for c, i in zip(labels, batch)]
        seeds = [derive_seed(args.seed, rnd, i) for i in batch]
        guidance = round_guidance(args, guided=batch[0] >= unguided)
        out = sample_batch(args, task, diffusion, head, labels, prompts, seeds, guidance)
        rows = metadata_rows(out, task.classes, guidance.w, rnd, batch, labels, prompts, seeds)
        if args.label_filter == "judge":
            for row, label in zip(rows, judge_labels(task, out.images)):
                row["judge_label"] = label
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


@torch.no_grad()
def judge_labels(task, images):
    """The judge's top-1 of generated images [B, C, H, W] in [0, 1], at the 8 bits they are written with."""
    pixels = (images.cpu() * 255).round() / 255
    return task.judge()(torch.stack([task.test.transform(im) for im in pixels])).argmax(1).tolist()


def write_card(run):
    """synthetic/README.md, the dataset card, for the images generated so far."""
    args = run.args
    predictor = f"{args.arch} with an Epistemic Head ({args.head}, K = {args.head_samples}), trained by this run"
    card = dataset_card(read_metadata(run.folder.metadata), run.task.classes, train_flags.saved_config(args), args.command,
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
    else:
        state = read_run_checkpoint(args.init_from, device) if args.init_from else None
        if state is None:
            if args.init_from:
                print(f"--init-from {args.init_from}: {livt.load_encoder(head.predictor, args.init_from)}",
                      file=sys.stderr)
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
                                 f"{tasks.MANY_SHOT}, few-shot < {tasks.FEW_SHOT}; tail: the rarest third (digits only); "
                                 "hard: the weakest third on validation at the end of pretraining (where there is a "
                                 "validation set), set then",
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
    write_json(run.folder.config, train_flags.saved_config(run.args))


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
          f"{sum(e.phase == 'finetune' for e in remaining)} fine-tuning epochs to go; "
          + (f"generation rounds at fine-tuning epochs {[e for _, e in rounds]} with {[run.sizes[r] for r, _ in rounds]} "
             f"images (w {args.guidance_weight:g}, {args.steps} steps, guidance scale {args.guidance_scale:g}, "
             f"{args.diffusion})\n" if rounds else "no generation rounds\n") +
          f"estimate on {run.device.type} x {run.world}: {duration(total)} "
          f"(generation {duration(images * gen / run.world)}, "
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
    prompts = [image_prompt(run.task, {}, 0, 0)] * n
    sample_batch(run.args, run.task, run.diffusion, run.head, [0] * n, prompts, list(range(n)), round_guidance(run.args),
                 steps=1)


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


if __name__ == "__main__":
    main()
