"""The paper's cycle: train a predictor with its Epistemic Head on real data, then fine-tune it while
generating Longtail-Guided data on a schedule, each round guided by the predictor as it is then.

    python train_loop.py                                  # embedded default: 8x8 digits, CPU, < 10 min
    python train_loop.py --dataset flowers --download     # the paper's setup: ResNet-50, SD 1.4
    torchrun --nproc_per_node 8 train_loop.py --dataset flowers
    python train_loop.py --resume runs/digits-w0.07-x6-seed0   # continue a killed run
    python train_loop.py --train-foundation --seed 0      # retrain assets/digits-unet bit for bit
    python train_loop.py --dataset flowers --refined-prompts prompts.json          # introspect.py's prompts
    python train_loop.py --dataset flowers --introspect-after 0 --vlm-url URL --llm-url URL   # automatic

A run folder holds config.json, metrics.json (per epoch and per generation round), accuracy.png,
rounds/round<r>.png (each round's images sorted by longtail signal), synthetic/ (the images and
manifest.jsonl) and checkpoint.pt. Every file is written atomically, so `--resume` after a kill at any
moment ends with the same metrics as an uninterrupted run.
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderTiny, DDIMScheduler, UNet2DModel
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, models
from torchvision.transforms import v2
from tqdm.auto import tqdm

import introspect
import ltg

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

DIGITS_UNET = Path(__file__).resolve().parent / "assets" / "digits-unet"
DATASETS = ("digits", "flowers", "pets", "cars", "caltech101", "imagenet-lt")
TORCHVISION = {"flowers": datasets.Flowers102, "pets": datasets.OxfordIIITPet, "cars": datasets.StanfordCars,
               "caltech101": datasets.Caltech101}
PROMPTS = {"flowers": "a photo of a {}, a type of flower.", "pets": "a photo of a {}, a type of pet.",
           "cars": "a photo of a {}, a type of car.", "caltech101": "a photo of a {}.",
           "imagenet-lt": "a photo of a {}."}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Flags left unset take these per-dataset values: the paper's for its datasets; for digits, values
# that fit the whole cycle in 10 minutes on 2 CPU cores.
PAPER = dict(arch="resnet50", pretrain_epochs=100, epochs=100, batch_size=64, synthetic=20.0, steps=50,
             guidance_scale=7.5, guidance_weight=0.1, gen_batch=8, workers=8,
             diffusion="CompVis/stable-diffusion-v1-4")
DEFAULTS = {
    "digits": dict(arch="cnn", pretrain_epochs=30, epochs=10, batch_size=16, synthetic=6.0, steps=20,
                   guidance_scale=2.0, guidance_weight=0.07, gen_batch=512, workers=0, diffusion=str(DIGITS_UNET)),
    "flowers": PAPER, "cars": PAPER, "caltech101": PAPER, "imagenet-lt": PAPER,
    "pets": PAPER | dict(synthetic=30.0),
}

# The embedded default: scikit-learn's 8x8 digits, a fixed stratified split, and a long-tailed train subset.
DIGITS_TEST_FRACTION, DIGITS_IMBALANCE = 0.4, 30.0
# The digits foundation model: 0.7M parameters, class 10 is the null class for classifier-free guidance.
FOUNDATION = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  num_class_embeds=11, norm_num_groups=8)
FOUNDATION_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


# Flags that are not part of a run's config.json: where it is, and the evidence mode's (derived or
# applying to many runs).
RUN_INDEPENDENT = ("resume", "out", "rounds", "compare", "seeds", "sweep", "budgets")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None (per-dataset defaults are in the help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """argparse's exit code 2, as one line: every bad value is named with what is accepted."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    d = "(default: per dataset; digits %s, paper datasets %s)"
    per = lambda k: d % (DEFAULTS["digits"][k], PAPER[k])  # noqa: E731
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits runs offline on a CPU; the others are the paper's (torchvision loaders)")
    p.add_argument("--data-root", default="data", help="where the torchvision datasets live")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--eval-set", action="append", default=[], metavar="NAME=DIR",
                   help="imagenet-lt only: an evaluation-only ImageFolder (ImageNet-V2: folders 0..999; "
                        "ImageNet-A: WordNet-id folders); repeatable")
    p.add_argument("--arch", help="'cnn' (small CNN) or any torchvision classifier name " + per("arch"))
    p.add_argument("--head", choices=ltg.HEADS, default="epinet", help="the Epistemic Head")
    p.add_argument("--head-samples", type=int, default=16, help="K predictions per input")
    p.add_argument("--pretrain-epochs", type=int, help="epochs on real data only, from scratch " + per("pretrain_epochs"))
    p.add_argument("--epochs", type=int, help="fine-tuning epochs, real + synthetic " + per("epochs"))
    p.add_argument("--batch-size", type=int, help=per("batch_size"))
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, cosine-annealed over each phase")
    p.add_argument("--synthetic", type=float,
                   help="synthetic budget as a multiple of the real training set; 0 = real-only baseline "
                        "(default: 20, pets 30, digits %s)" % DEFAULTS["digits"]["synthetic"])
    p.add_argument("--gen-epochs", help="fine-tuning epochs that start with a generation round, comma-separated; "
                                        "equal shares of the budget (default: every 5 epochs from 0)")
    p.add_argument("--guidance-weight", type=float, help="w of Eqn 11; 0 = unguided synthetic baseline " + per("guidance_weight"))
    p.add_argument("--signal", choices=ltg.SIGNALS, default="total", help="the longtail signal (Eqn 4)")
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True,
                   help="w is the guidance term's share of |eps| at every step (ltg.Guidance); --no-rescale: w "
                        "multiplies the raw gradient as in Eqn 11")
    p.add_argument("--guide-every", type=int, default=1,
                   help="guide every k-th DDIM step (ltg.Guidance(every=k)); 2 about halves guidance's cost")
    p.add_argument("--guidance-decoder", metavar="PATH_OR_ID",
                   help="a cheaper VAE decoder for the guidance pass only, e.g. madebyollin/taesd (a diffusers "
                        "AutoencoderTiny); Stable Diffusion only")
    p.add_argument("--refined-prompts", metavar="FILE",
                   help="JSON {class name: [prompt, ...]} (introspect.py summarise writes it): generate with these "
                        "prompts instead of the class template; classes absent from the file keep the template")
    p.add_argument("--introspect-after", type=int, metavar="ROUND",
                   help="after generation round ROUND, describe the run's hardest images with a VLM, summarise them "
                        "into refined prompts with an LLM (introspect.py) and generate the later rounds with them")
    p.add_argument("--vlm", metavar="PATH_OR_ID", help="--introspect-after: a LLaVA-NeXT model (transformers)")
    p.add_argument("--vlm-url", metavar="URL", help="--introspect-after: an OpenAI-compatible endpoint for describing")
    p.add_argument("--llm", metavar="PATH_OR_ID", help="--introspect-after: a chat causal LM (transformers)")
    p.add_argument("--llm-url", metavar="URL", help="--introspect-after: an OpenAI-compatible endpoint for summarising")
    p.add_argument("--diffusion", help="diffusers folder or hub id " + per("diffusion"))
    p.add_argument("--steps", type=int, help="DDIM steps " + per("steps"))
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance " + per("guidance_scale"))
    p.add_argument("--gen-batch", type=int, help="images per generation batch " + per("gen_batch"))
    p.add_argument("--workers", type=int, help="DataLoader workers " + per("workers"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads, fixed so reruns are bit-identical")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default: runs/<dataset>-w<w>-x<synthetic>-seed<seed>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run in RUN_DIR with its saved flags")
    p.add_argument("--compare", action="store_true",
                   help="instead of one run: the evidence. Real only, unguided (w = 0) and LTG (--guidance-weight) "
                        "for --seeds seeds, plus --sweep and --budgets arms; writes comparison.{md,json,png} to --out")
    p.add_argument("--seeds", type=int, default=3, help="--compare: seeds 0..N-1 per arm")
    p.add_argument("--sweep", metavar="W,W,...", help="--compare: also one arm per guidance weight, and sweep.png")
    p.add_argument("--budgets", metavar="X,X,...",
                   help="--compare: also unguided and LTG arms at these synthetic budgets, and budgets.png")
    p.add_argument("--train-foundation", action="store_true",
                   help="instead of the cycle: train the digits diffusion model into --out (default assets/digits-unet)")
    p.add_argument("--foundation-steps", type=int, default=1000, help="training steps of --train-foundation")
    return p


def parse_args(argv=None):
    """Flags, with a resumed run's saved flags as defaults and per-dataset defaults for what is unset."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:
        config = Path(args.resume) / "config.json"
        if not config.is_file():
            parser.error(f"--resume {args.resume}: no run there ({config} is missing)")
        parser.set_defaults(**json.loads(config.read_text()))
        args = parser.parse_args(argv)
        args.out = args.resume
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(parser, args)
    return parser, args


def check_args(parser, args):
    """Refuse bad values before anything is read or written."""
    if not (math.isfinite(args.guidance_weight) and args.guidance_weight >= 0):
        parser.error(f"--guidance-weight {args.guidance_weight}: must be finite and >= 0 (0 = unguided synthetic)")
    if not (math.isfinite(args.synthetic) and args.synthetic >= 0):
        parser.error(f"--synthetic {args.synthetic}: must be >= 0 (0 = real-only baseline)")
    for flag in ("epochs", "batch_size", "steps", "gen_batch", "head_samples", "threads", "foundation_steps",
                 "guide_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    for flag in ("pretrain_epochs", "workers"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if args.arch != "cnn" and args.arch not in models.list_models(module=models):
        parser.error(f"--arch {args.arch}: unknown; use 'cnn' or a torchvision classifier such as resnet50 "
                     f"(torchvision.models.list_models(module=torchvision.models))")
    if args.eval_set and args.dataset != "imagenet-lt":
        parser.error(f"--eval-set is for --dataset imagenet-lt (ImageNet-V2, ImageNet-A), not {args.dataset}")
    for spec in args.eval_set:
        if "=" not in spec:
            parser.error(f"--eval-set {spec}: expected NAME=DIR, e.g. imagenet-v2=/data/imagenetv2")
    args.rounds = generation_epochs(parser, args)
    check_introspection_args(parser, args)
    args.sweep = number_list(parser, "--sweep", args.sweep)
    args.budgets = number_list(parser, "--budgets", args.budgets)
    if (args.sweep or args.budgets) and not args.compare:
        parser.error("--sweep and --budgets are arms of --compare: add --compare")
    if args.compare and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be >= 1")


def number_list(parser, flag, text):
    """'0,0.1,0.3' -> [0.0, 0.1, 0.3]: finite, >= 0, at least one."""
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        parser.error(f"{flag} {text!r}: expected comma-separated numbers >= 0, e.g. 0,0.1,0.3")
    return values


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


# ---------------------------------------------------------------------------------------------
# Files: each one written to a temp file beside it and renamed, so a kill leaves the old or the new.
# ---------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """`write(f)` into a buffer, then introspect.write_atomic: temp file beside it, os.replace."""
    buffer = io.BytesIO()
    write(buffer)
    introspect.write_atomic(path, buffer.getvalue())


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_jsonl(path, rows):
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def write_png(path, image):
    """image [C, H, W] in [0, 1] -> an 8-bit PNG (grey for C = 1)."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()      # [H, W, C]
    pil = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    atomic_write(path, lambda f: pil.save(f, format="PNG"))


def write_figure(path, fig):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Data: (image, label) datasets with the paper's augmentations; synthetic images come from PNG files.
# ---------------------------------------------------------------------------------------------

class DataMissing(Exception):
    """The dataset is not on disk: the message names the path and the flag that fetches it."""


@dataclass
class Task:
    classes: list            # class names, index = label
    train: Dataset           # real training images with augmentation
    test: Dataset
    evals: dict              # evaluation-only sets, name -> Dataset
    train_labels: list       # label of each real training image (class counts, tail classes)
    train_tf: v2.Compose     # the augmentation, also applied to synthetic images
    mode: str                # PIL mode of the images: "L" (digits) or "RGB"
    prompt: str | None       # per-class prompt template; None for the class-conditional digits model

    def preprocess(self, x):
        """Images [B, C, H, W] in [0, 1] -> the predictor's input, differentiably (for guidance)."""
        if self.mode == "L":
            return (x - 0.5) / 0.5
        x = F.interpolate(x.float(), size=224, mode="bilinear", antialias=True)
        return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


class Images(Dataset):
    """(image, label) pairs from in-memory tensors [C, H, W] in [0, 1] or image files."""

    def __init__(self, images, labels, transform, mode="RGB"):
        self.images, self.labels, self.transform, self.mode = images, labels, transform, mode

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if not isinstance(image, torch.Tensor):
            with Image.open(image) as pil:
                image = pil.convert(self.mode)
        return self.transform(image), self.labels[i]


class ImageNetFolder(datasets.ImageFolder):
    """An evaluation-only ImageNet variant: class folders named by index (ImageNet-V2) or WordNet id (ImageNet-A)."""

    def __init__(self, root, wnid_to_label, transform):
        self.wnid_to_label = wnid_to_label
        super().__init__(root, transform=transform)

    def find_classes(self, directory):
        names = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        return names, {n: int(n) if n.isdigit() else self.wnid_to_label[n] for n in names}


def digits_split(seed=0):
    """scikit-learn's 1,797 8x8 digits as (x [N, 1, 8, 8] in [0, 1], y [N]), split into a fixed stratified
    train and test set."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
                                   random_state=seed)
    return (x[train], y[train]), (x[test], y[test])


def long_tailed(y, imbalance):
    """Indices of a long-tailed subset: class c keeps n_max * imbalance^(-c / (C - 1)) of its images
    (an exponential profile from class 0, the most common, to class C - 1, the rarest)."""
    classes = int(y.max()) + 1
    n_max = int(torch.bincount(y).min())
    keep = [torch.nonzero(y == c).flatten()[:round(n_max * imbalance ** (-c / (classes - 1)))] for c in range(classes)]
    return torch.cat(keep).sort().values


def digits_task():
    (x, y), (x_test, y_test) = digits_split()
    subset = long_tailed(y, DIGITS_IMBALANCE)
    # A scaled-down version of the paper's augmentation: rotation 15, crops with 1 px padding, no flips.
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    normalize = v2.Normalize([0.5], [0.5])
    train_tf = v2.Compose(to_float + [v2.RandomRotation(15), v2.RandomCrop(8, padding=1), normalize])
    test_tf = v2.Compose(to_float + [normalize])
    labels = y[subset].tolist()
    return Task([str(c) for c in range(10)], Images(x[subset], labels, train_tf), Images(x_test, y_test.tolist(), test_tf),
                {}, labels, train_tf, "L", None)


def paper_transforms():
    """The paper's augmentation: random rotation (15 degrees), 224x224 crops, horizontal flips."""
    head = [v2.RGB(), v2.ToImage()]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v2.Compose(head + [v2.RandomResizedCrop(224), v2.RandomRotation(15), v2.RandomHorizontalFlip()] + tail)
    test = v2.Compose(head + [v2.Resize(256), v2.CenterCrop(224)] + tail)
    return train, test


def torchvision_task(name, root, download):
    """Flowers102, OxfordIIITPet, StanfordCars or Caltech101 through torchvision."""
    cls = TORCHVISION[name]
    train_tf, test_tf = paper_transforms()
    try:
        if name == "caltech101":  # no official split: a fixed stratified 80/20 split of all images
            train, test = (cls(root, transform=tf, download=download) for tf in (train_tf, test_tf))
            train_idx, test_idx = train_test_split(np.arange(len(train.y)), test_size=0.2, stratify=train.y,
                                                   random_state=0)
            classes, labels = train.categories, [train.y[i] for i in train_idx]
            train, test = Subset(train, train_idx), Subset(test, test_idx)
        else:
            splits = ("trainval", "test") if name == "pets" else ("train", "test")
            train, test = (cls(root, split, transform=tf, download=download) for split, tf in zip(splits, (train_tf, test_tf)))
            classes = train.classes
            # the label lists torchvision keeps (reading them through __getitem__ would decode every image)
            labels = list(train._labels) if hasattr(train, "_labels") else [c for _, c in train._samples]
    except (RuntimeError, ValueError) as e:
        fetch = ("StanfordCars cannot be downloaded by torchvision any more: place it by hand"
                 if name == "cars" else "pass --download to fetch it")
        raise DataMissing(f"no {cls.__name__} data under {Path(root).resolve()} ({e}); {fetch}") from e
    return Task(list(classes), train, test, {}, labels, train_tf, "RGB", PROMPTS[name])


def imagenet_lt_task(root, eval_sets):
    """ImageNet-LT from its list files in --data-root (lines 'train/n01440764/x.JPEG 0'), plus
    evaluation-only sets (ImageNet-V2, ImageNet-A) from local folders."""
    train_tf, test_tf = paper_transforms()
    lists = {}
    for split in ("train", "test"):
        path = Path(root) / f"ImageNet_LT_{split}.txt"
        if not path.is_file():
            raise DataMissing(f"no ImageNet-LT list {path.resolve()}; ImageNet-LT cannot be downloaded: put the "
                              "ImageNet images and ImageNet_LT_{train,test}.txt under --data-root")
        lists[split] = [line.split() for line in path.read_text().splitlines() if line.strip()]
    wnid_to_label = {Path(f).parent.name: int(label) for f, label in lists["train"]}
    train, test = (Images([Path(root) / f for f, _ in lists[s]], [int(c) for _, c in lists[s]], tf)
                   for s, tf in (("train", train_tf), ("test", test_tf)))
    evals = {}
    for spec in eval_sets:
        name, folder = spec.split("=", 1)
        if not Path(folder).is_dir():
            raise DataMissing(f"no {name} images under {Path(folder).resolve()} (--eval-set {spec}); "
                              "it cannot be downloaded by torchvision: point --eval-set at a local copy")
        evals[name] = ImageNetFolder(folder, wnid_to_label, test_tf)
    classes = models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return Task(classes, train, test, evals, train.labels, train_tf, "RGB", PROMPTS["imagenet-lt"])


def load_task(args):
    if args.dataset == "digits":
        return digits_task()
    if args.dataset == "imagenet-lt":
        return imagenet_lt_task(args.data_root, args.eval_set)
    return torchvision_task(args.dataset, args.data_root, args.download)


def tail_classes(labels, num_classes):
    """The rarest third of the classes in the (long-tailed) training set."""
    counts = np.bincount(labels, minlength=num_classes)
    return sorted(np.argsort(counts, kind="stable")[:max(1, round(num_classes / 3))].tolist())


# ---------------------------------------------------------------------------------------------
# Models: the predictor with its Epistemic Head, and the diffusion model that generates.
# ---------------------------------------------------------------------------------------------

def small_cnn(num_classes, channels=1):
    """The digits predictor: 8x8 input, 64 penultimate features."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # [B, 32 * 4 * 4]
        nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, num_classes))                  # h [B, 64] -> [B, C]


def build_head(args, num_classes, channels):
    """The predictor, from scratch, wrapped by the Epistemic Head (K logits per input)."""
    predictor = (small_cnn(num_classes, channels) if args.arch == "cnn"
                 else models.get_model(args.arch, weights=None, num_classes=num_classes))
    return ltg.EpistemicHead(predictor, args.head_samples, args.head, seed=args.seed)


class Learner(nn.Module):
    """Predictor and head as one module, so DistributedDataParallel sees a single forward.
    The head's loss reaches the head only (stop-gradient features), the CE loss the predictor."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, y):                                                # x [B, C, H, W], y [B]
        h, mu = self.head.features_and_logits(x)                            # [B, F], [B, classes]
        return F.cross_entropy(mu, y) + self.head.loss(h, mu, y)


def load_diffusion(args, device):
    """(model, scheduler, guidance decoder): the digits UNet and its scheduler, or a Stable Diffusion pipeline
    (its own scheduler) and the optional cheaper decoder for the guidance pass."""
    if args.dataset == "digits":
        unet = UNet2DModel.from_pretrained(args.diffusion).to(device).eval()
        return unet, DDIMScheduler.from_pretrained(args.diffusion), None
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    decoder = (AutoencoderTiny.from_pretrained(args.guidance_decoder, dtype=dtype).to(device).eval()
               if args.guidance_decoder else None)
    return ltg.load_stable_diffusion(args.diffusion, device, dtype), None, decoder


# ---------------------------------------------------------------------------------------------
# Generation rounds: each rank makes its share of fixed batches, writes its own manifest shard after
# each batch, and rank 0 merges the shards. A resumed round skips the batches the manifests hold;
# since batches and seeds are fixed, the images are the same as without the kill.
# ---------------------------------------------------------------------------------------------

def round_sizes(total, rounds):
    """Equal shares of the budget, the first rounds taking the remainder."""
    return [total // rounds + (r < total % rounds) for r in range(rounds)]


def manifest_rows(run):
    """All manifest rows of the run: the merged manifest and any rank shards not merged yet."""
    rows = read_jsonl(run / "synthetic" / "manifest.jsonl")
    for shard in sorted((run / "synthetic").glob("manifest.rank*.jsonl")):
        rows += read_jsonl(shard)
    return sorted({(r["round"], r["index"]): r for r in rows}.values(), key=lambda r: (r["round"], r["index"]))


def image_prompt(task, refined, label, index):
    """The prompt of image `index` (class `label`): the class's refined prompts in turn, else its template;
    None for the class-conditional digits model."""
    name = task.classes[label]
    if name in refined:
        return refined[name][index // len(task.classes) % len(refined[name])]
    return task.prompt.format(name) if task.prompt else None


def round_prompts(args, task, run, rnd):
    """{class name: refined prompts} that round `rnd` generates with ({} = the class templates)."""
    if args.refined_prompts:
        return introspect.load_refined_prompts(args.refined_prompts, task.classes)
    if args.introspect_after is not None and rnd > args.introspect_after:
        return introspect.load_refined_prompts(introspection_dir(run) / "refined_prompts.json", task.classes)
    return {}


def introspection_dir(run):
    return run / "synthetic" / "introspection"


def introspect_round(args, task, run):
    """The automatic mode: describe, summarise and report on the run's images so far (resumable: the
    introspection logs skip what is done). Writes synthetic/introspection/{refined_prompts.json,report.md}."""
    introspect.introspect_run(run / "synthetic", vlm=args.vlm, vlm_url=args.vlm_url, llm=args.llm,
                              llm_url=args.llm_url, class_names=task.classes)


def sample_batch(args, task, diffusion, head, labels, prompts, seeds, guidance):
    model, scheduler, guidance_decoder = diffusion
    kwargs = dict(preprocess=task.preprocess, num_inference_steps=args.steps, progress=False)
    if task.prompt is None:
        return ltg.sample_class_conditional(model, scheduler, head, labels, seeds, guidance, args.guidance_scale, **kwargs)
    device = next(head.parameters()).device
    # The fp16 pipeline's decoder and the fp32 predictor meet outside ltg's own autocast too.
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return ltg.sample_stable_diffusion(model, head, prompts, seeds, guidance, args.guidance_scale,
                                           guidance_decoder=guidance_decoder, **kwargs)


def generate_round(args, task, diffusion, head, run, rnd, count, rank, world):
    """Round `rnd`: `count` images, class i % C for image i, guided by the predictor as it is now."""
    synthetic = run / "synthetic"
    shard = synthetic / f"manifest.rank{rank}.jsonl"
    done = {(r["round"], r["index"]) for r in manifest_rows(run)}
    mine = read_jsonl(shard)
    batches = [range(s, min(s + args.gen_batch, count)) for s in range(0, count, args.gen_batch)]
    todo = [b for i, b in enumerate(batches) if i % world == rank and (rnd, b[0]) not in done]
    guidance = ltg.Guidance(w=args.guidance_weight, signal=args.signal, rescale=args.rescale, every=args.guide_every)
    C = len(task.classes)
    refined = round_prompts(args, task, run, rnd)
    for batch in tqdm(todo, desc=f"round {rnd}", disable=rank != 0, leave=False):
        labels = [i % C for i in batch]
        prompts = [image_prompt(task, refined, c, i) for c, i in zip(labels, batch)]
        seeds = [derive_seed(args.seed, rnd, i) for i in batch]
        out = sample_batch(args, task, diffusion, head, labels, prompts, seeds, guidance)
        ratio = float(np.median(out.guidance_ratio)) if out.guidance_ratio else 0.0  # at the batch's median step
        for k, i in enumerate(batch):
            file = f"r{rnd:02d}_{i:06d}.png"
            write_png(synthetic / file, out.images[k])
            mine.append(dict(file=file, round=rnd, index=i, **{"class": labels[k]}, class_name=task.classes[labels[k]],
                             prompt=prompts[k],
                             seed=seeds[k], w=args.guidance_weight, signal=out.signal[k].item(),
                             label=out.label[k].item(), guidance_ratio=ratio))
        write_jsonl(shard, mine)  # after the batch's PNGs: a listed image is always on disk
    barrier(world)
    if rank == 0:
        write_jsonl(synthetic / "manifest.jsonl", manifest_rows(run))
        for s in synthetic.glob("manifest.rank*.jsonl"):
            s.unlink()
    barrier(world)
    return [r for r in manifest_rows(run) if r["round"] == rnd]


def plot_round(run, rows, task, limit=64):
    """rounds/round<r>.png: a grid of the round's images sorted by longtail signal (highest first), with
    their class and the predictor's label; at most `limit` images, evenly spaced along the ranking."""
    ranked = sorted(rows, key=lambda r: -r["signal"])
    shown = [ranked[i] for i in np.linspace(0, len(ranked) - 1, min(limit, len(ranked))).round().astype(int)]
    cols = min(8, len(shown))
    rows_ = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(1.6 * cols, 1.9 * rows_), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        with Image.open(run / "synthetic" / r["file"]) as im:
            ax.imshow(np.asarray(im), cmap="gray" if task.mode == "L" else None, vmin=0, vmax=255)
        name = lambda c: task.classes[c][:12]  # noqa: E731
        ax.set_title(f"{name(r['class'])} -> {name(r['label'])}\n{r['signal']:.3f}", fontsize=7,
                     color="black" if r["class"] == r["label"] else "red")
    rnd = rows[0]["round"]
    fig.suptitle(f"round {rnd}: class -> predictor's label, longtail signal (sorted)", fontsize=9)
    write_figure(run / "rounds" / f"round{rnd}.png", fig)


def plot_accuracy(path, metrics):
    epochs = metrics["epochs"]
    x = range(len(epochs))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [e["acc"] for e in epochs], label="overall")
    ax.plot(x, [e["tail_acc"] for e in epochs], label="tail classes (rarest third)")
    pretrain = sum(e["phase"] == "pretrain" for e in epochs)
    for r in metrics["rounds"]:
        ax.axvline(pretrain + r["epoch"] - 0.5, color="gray", ls=":", lw=1)
    if pretrain:
        ax.axvline(pretrain - 0.5, color="black", ls="--", lw=1, label="fine-tuning starts")
    ax.set(xlabel="epoch (dotted: generation rounds)", ylabel="test top-1 accuracy", ylim=(0, 1))
    ax.legend(loc="lower right")
    write_figure(path, fig)


# ---------------------------------------------------------------------------------------------
# Training and evaluation.
# ---------------------------------------------------------------------------------------------

def barrier(world):
    if world > 1:
        dist.barrier()


def train_epoch(learner, loader, optimizer, device, world, desc):
    """One epoch; returns the mean loss over all ranks."""
    learner.train()
    total = torch.zeros(2, dtype=torch.float64)                              # [sum of losses, images]
    for x, y in tqdm(loader, desc=desc, disable=dist.is_initialized() and dist.get_rank() != 0, leave=False):
        x, y = x.to(device), y.to(device)
        loss = learner(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate(predictor, dataset, num_classes, device, workers):
    """Per-class (correct, count) of the predictor's top-1 on a dataset: two int arrays [C]."""
    predictor.eval()
    correct, count = np.zeros(num_classes, int), np.zeros(num_classes, int)
    for x, y in DataLoader(dataset, batch_size=256, num_workers=workers):
        hit = (predictor(x.to(device)).argmax(1).cpu() == y).numpy()
        np.add.at(correct, y.numpy(), hit)
        np.add.at(count, y.numpy(), 1)
    return correct, count


def epoch_metrics(predictor, task, tail, device, workers):
    correct, count = evaluate(predictor, task.test, len(task.classes), device, workers)
    metrics = dict(acc=correct.sum() / count.sum(), tail_acc=correct[tail].sum() / max(1, count[tail].sum()),
                   per_class_acc=(correct / np.maximum(count, 1)).round(6).tolist())
    for name, dataset in task.evals.items():
        c, n = evaluate(predictor, dataset, len(task.classes), device, workers)
        metrics[f"{name}_acc"] = c.sum() / max(1, n.sum())
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()}


def make_optimizer(learner, epochs, lr):
    optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=lr)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def default_out(args):
    """runs/<dataset>-w<w>-x<budget>-seed<seed>, with a -2, -3, ... suffix when that run exists."""
    base = Path("runs") / f"{args.dataset}-w{args.guidance_weight:g}-x{args.synthetic:g}-seed{args.seed}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def run_cycle(parser, args):
    rank, world, device = init_distributed()
    try:
        task = load_task(args)
    except DataMissing as e:
        parser.error(str(e))
    if args.refined_prompts:
        try:
            introspect.load_refined_prompts(args.refined_prompts, task.classes)
        except introspect.IntrospectError as e:
            parser.error(f"--refined-prompts: {e}")
    C = len(task.classes)
    channels = 1 if task.mode == "L" else 3
    torch.manual_seed(args.seed)
    head = build_head(args, C, channels).to(device)
    if args.out is None:
        args.out = str(default_out(args))
    elif not args.resume and (Path(args.out) / "config.json").exists():
        parser.error(f"--out {args.out} already holds a run: continue it with --resume {args.out} or pick another --out")
    run = Path(args.out)
    checkpoint = run / "checkpoint.pt"
    state = torch.load(checkpoint, map_location=device) if args.resume and checkpoint.exists() else None
    if state is not None and state["num_classes"] != C:
        parser.error(f"--resume {args.resume}: checkpoint has {state['num_classes']} classes but --dataset "
                     f"{args.dataset} has {C}; resume with the run's own dataset")
    try:
        diffusion = load_diffusion(args, device) if args.rounds else None
    except OSError as e:
        flags = f"--diffusion {args.diffusion}" + (f" or --guidance-decoder {args.guidance_decoder}"
                                                   if args.guidance_decoder else "")
        parser.error(f"{flags}: cannot load it ({str(e).splitlines()[0]})"
                     + ("; retrain it with --train-foundation" if args.dataset == "digits" else ""))

    barrier(world)  # every rank has chosen the same run folder before rank 0 creates it

    # From here on the run folder is written.
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    tail = tail_classes(task.train_labels, C)
    total = round(args.synthetic * len(task.train))
    sizes = round_sizes(total, len(args.rounds)) if args.rounds else []
    learner = Learner(head).to(device)
    if world > 1:
        learner = DistributedDataParallel(learner, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = dict(dataset=args.dataset, classes=task.classes, tail_classes=tail,
                   train_counts=np.bincount(task.train_labels, minlength=C).tolist(), synthetic_budget=total,
                   epochs=[], rounds=[])
    start = 0
    if state is not None:  # the run's history; what follows from the flags is recomputed
        head.load_state_dict(state["head"])
        metrics |= {k: state["metrics"][k] for k in ("epochs", "rounds")}
        start = state["epoch"] + 1
    if rank == 0:
        write_json(run / "config.json", {k: v for k, v in vars(args).items() if k not in RUN_INDEPENDENT})
    barrier(world)

    phases = [("pretrain", e, args.pretrain_epochs) for e in range(args.pretrain_epochs)]
    phases += [("finetune", e, args.epochs) for e in range(args.epochs)]
    bar = tqdm(range(start, len(phases)), desc="epochs", disable=rank != 0, initial=start, total=len(phases))
    for g in bar:
        phase, epoch, length = phases[g]
        if epoch == 0 or g == start:
            optimizer, schedule = make_optimizer(learner, length, args.lr)
            if epoch > 0:  # resuming inside a phase
                optimizer.load_state_dict(state["optimizer"])
                schedule.load_state_dict(state["schedule"])
        if phase == "finetune" and epoch in args.rounds:
            rnd = args.rounds.index(epoch)
            rows = generate_round(args, task, diffusion, head, run, rnd, sizes[rnd], rank, world)
            if rank == 0:
                plot_round(run, rows, task)
                if rnd == args.introspect_after:
                    introspect_round(args, task, run)
            barrier(world)  # the refined prompts exist before any rank generates with them
            if len(metrics["rounds"]) == rnd:  # a resumed round is recorded once
                metrics["rounds"].append(dict(round=rnd, epoch=epoch, images=len(rows),
                                              mean_signal=float(np.mean([r["signal"] for r in rows])),
                                              guidance_ratio=float(np.mean([r["guidance_ratio"] for r in rows]))))
        train = task.train
        synthetic = [r for r in manifest_rows(run) if r["round"] < len(metrics["rounds"])] if phase == "finetune" else []
        if synthetic:
            train = ConcatDataset([train, Images([run / "synthetic" / r["file"] for r in synthetic],
                                                 [r["class"] for r in synthetic], task.train_tf, task.mode)])
        # Each epoch's randomness (augmentation, epinet indices) is seeded from (seed, epoch, rank): a resumed
        # run and every rank draw what an uninterrupted run would, with no RNG state to carry.
        torch.manual_seed(derive_seed(args.seed, 1_000_000 + g, rank))
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(g)
        loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
        lr = schedule.get_last_lr()[0]
        loss = train_epoch(learner, loader, optimizer, device, world, f"{phase} {epoch}")
        schedule.step()
        if rank == 0:
            metrics["epochs"].append(dict(epoch=g, phase=phase, phase_epoch=epoch, lr=lr, loss=loss,
                                          real=len(task.train), synthetic=len(synthetic),
                                          **epoch_metrics(head.predictor, task, tail, device, args.workers)))
            state = dict(epoch=g, num_classes=C, head=head.state_dict(), optimizer=optimizer.state_dict(),
                         schedule=schedule.state_dict(), metrics=metrics)
            data = io.BytesIO()
            torch.save(state, data)
            introspect.write_atomic(checkpoint, data.getvalue())
            if g == args.pretrain_epochs - 1:  # the predictor before any synthetic data: runs that differ only
                introspect.write_atomic(run / "pretrained.pt", data.getvalue())  # after it can start here
            write_json(run / "metrics.json", metrics)
            plot_accuracy(run / "accuracy.png", metrics)
            last = metrics["epochs"][-1]
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{last['acc']:.3f}", tail=f"{last['tail_acc']:.3f}")
        barrier(world)
    if rank == 0:
        last = metrics["epochs"][-1] if metrics["epochs"] else {}
        print(f"done: test acc {last.get('acc', float('nan')):.4f}, tail acc {last.get('tail_acc', float('nan')):.4f}; "
              f"results in {run}/ (metrics.json, accuracy.png, rounds/, synthetic/manifest.jsonl, checkpoint.pt)")
    if world > 1:
        dist.destroy_process_group()


def init_distributed():
    """(rank, world size, device): one process without torchrun, a process group under torchrun."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


# ---------------------------------------------------------------------------------------------
# The digits foundation model: a class-conditional DDPM on the whole balanced train split, with label
# dropout to the null class 10 for classifier-free guidance. Deterministic from --seed.
# ---------------------------------------------------------------------------------------------

def train_foundation(args, batch_size=128, lr=1e-3, label_dropout=0.1):
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    (x, y), _ = digits_split()
    x = x * 2 - 1                                                            # [N, 1, 8, 8] in [-1, 1]
    unet = UNet2DModel(**FOUNDATION)
    scheduler = DDIMScheduler(**FOUNDATION_SCHEDULER)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(args.seed)
    null = FOUNDATION["num_class_embeds"] - 1
    for _ in tqdm(range(args.foundation_steps), desc="foundation"):
        i = torch.randint(len(y), (batch_size,), generator=g)
        labels = torch.where(torch.rand(batch_size, generator=g) < label_dropout, null, y[i])
        noise = torch.randn(batch_size, 1, 8, 8, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x[i], noise, t), t, class_labels=labels).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out = Path(args.out or DIGITS_UNET)
    unet.save_pretrained(out)   # config.json + diffusion_pytorch_model.safetensors
    scheduler.save_pretrained(out)  # scheduler_config.json beside it
    print(f"foundation model ({sum(p.numel() for p in unet.parameters()):,} parameters, final loss "
          f"{loss.item():.4f}) saved to {out}/")


# ---------------------------------------------------------------------------------------------
# The evidence (--compare): arms that differ only in w and the synthetic budget, each a normal run in
# OUT/<arm>/seed<s> (resumable, finished runs skipped), then tables and figures over the seeds.
# ---------------------------------------------------------------------------------------------

def evidence_arms(args):
    """{arm name: (w, synthetic budget)}, each (w, budget) once."""
    w, x = args.guidance_weight, args.synthetic
    arms = {"real": (0.0, 0.0), "unguided": (0.0, x), "ltg": (w, x)}
    arms |= {f"w{v:g}": (v, x) for v in args.sweep}
    arms |= {f"{name}-x{b:g}": (v, b) for b in args.budgets for name, v in (("unguided", 0.0), ("ltg", w))}
    unique = {}
    for name, key in arms.items():
        unique.setdefault(key, name)
    return {name: key for key, name in unique.items()}


def arm_args(parser, args, run, w, budget, seed):
    """The flags of one arm's run; it starts from a sibling run's pretrained predictor when one exists
    (pretraining depends on the seed only)."""
    sub = argparse.Namespace(**vars(args))
    sub.compare, sub.sweep, sub.budgets = False, [], []
    sub.guidance_weight, sub.synthetic, sub.seed, sub.out = w, budget, seed, str(run)
    sub.gen_epochs = args.gen_epochs if budget > 0 else None  # the real-only arm has no rounds
    sub.rounds = generation_epochs(parser, sub)
    sub.resume = str(run) if (run / "config.json").exists() else None
    if sub.resume is None:
        pretrained = sorted(run.parent.parent.glob(f"*/seed{seed}/pretrained.pt"))
        if pretrained and args.pretrain_epochs > 0:
            introspect.write_atomic(run / "checkpoint.pt", pretrained[0].read_bytes())
            sub.resume = str(run)
    return sub


def finished(run, args):
    metrics = run / "metrics.json"
    return metrics.exists() and len(json.loads(metrics.read_text())["epochs"]) == args.pretrain_epochs + args.epochs


def train_judge(args, out, task, epochs=30):
    """A classifier trained on the balanced train split (digits only), with the predictor's augmentation: its
    accuracy on generated images says whether they still show their class. Cached in OUT/judge.pt."""
    path = out / "judge.pt"
    judge = small_cnn(10)
    if path.exists():
        judge.load_state_dict(torch.load(path))
        return judge.eval()
    torch.manual_seed(args.seed)
    (x, y), _ = digits_split()
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="judge", leave=False):
        for i in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(judge(torch.stack([task.train_tf(im) for im in x[i]])), y[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    atomic_write(path, lambda f: torch.save(judge.state_dict(), f))
    return judge.eval()


def accuracy(predictor, dataset, num_classes):
    correct, count = evaluate(predictor, dataset, num_classes, torch.device("cpu"), workers=0)
    return correct.sum() / count.sum()


def judge_accuracy(judge, task, run, rows):
    """The share of a run's generated images that the judge assigns to the class they were made for."""
    if not rows:
        return None
    images = Images([run / "synthetic" / r["file"] for r in rows], [r["class"] for r in rows], task.test.transform,
                    task.mode)
    return float(accuracy(judge, images, len(task.classes)))


def run_summary(run, judge, task):
    """Final accuracies and what the run generated."""
    last = json.loads((run / "metrics.json").read_text())["epochs"][-1]
    rows = read_jsonl(run / "synthetic" / "manifest.jsonl")
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else None  # noqa: E731
    return dict(acc=last["acc"], tail_acc=last["tail_acc"], signal=mean("signal"),
                guidance_ratio=mean("guidance_ratio"), judge_acc=judge_accuracy(judge, task, run, rows) if judge else None)


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                n=len(values))


def paired(a, b):
    """Mean and standard error of a - b over seeds (same seed, same budget and schedule)."""
    d = np.array([x - y for x, y in zip(a, b)])
    return dict(mean=float(d.mean()), se=float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
                n=len(d))


def run_evidence(parser, args):
    out = Path(args.out or f"runs/{args.dataset}-compare")
    arms = evidence_arms(args)
    seeds = list(range(args.seeds))
    task = digits_task() if args.dataset == "digits" else None
    judge = train_judge(args, out, task) if task else None
    results = {}
    for name, (w, budget) in arms.items():
        for seed in seeds:
            run = out / name / f"seed{seed}"
            if not finished(run, args):
                print(f"--compare: arm {name} (w {w:g}, synthetic x{budget:g}), seed {seed} -> {run}")
                run_cycle(parser, arm_args(parser, args, run, w, budget, seed))
            results.setdefault(name, []).append(run_summary(run, judge, task))
    report = evidence_report(args, arms, results)
    if judge:
        report["judge_test_acc"] = float(accuracy(judge, task.test, len(task.classes)))
    write_json(out / "comparison.json", report)
    atomic_write(out / "comparison.md", lambda f: f.write(evidence_markdown(args, report).encode()))
    plot_comparison(out / "comparison.png", report)
    if args.sweep:
        plot_sweep(out / "sweep.png", out, [n for n, (w, b) in arms.items() if b == args.synthetic and n != "real"],
                   arms)
    if args.budgets:
        plot_budgets(out / "budgets.png", report)
    print(f"done: {out}/comparison.md (and comparison.json, comparison.png"
          + (", sweep.png" if args.sweep else "") + (", budgets.png" if args.budgets else "") + ")")


def evidence_report(args, arms, results):
    arm_rows = {}
    for name, runs in results.items():
        w, budget = arms[name]
        arm_rows[name] = dict(w=w, synthetic=budget, **{k: mean_std([r[k] for r in runs]) for k in runs[0]},
                              per_seed=runs)
    base = {b: n for n, (w, b) in arms.items() if w == 0}  # the unguided arm of each budget
    for name, row in arm_rows.items():
        ref = base.get(row["synthetic"])
        if row["w"] > 0 and ref:
            row["minus_unguided"] = {k: paired([r[k] for r in row["per_seed"]],
                                               [r[k] for r in arm_rows[ref]["per_seed"]]) for k in ("acc", "tail_acc")}
    return dict(dataset=args.dataset, seeds=args.seeds, guidance_weight=args.guidance_weight,
                rescale=args.rescale, synthetic=args.synthetic, schedule=args.rounds, epochs=args.epochs,
                pretrain_epochs=args.pretrain_epochs, signal=args.signal,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}", arms=arm_rows)


def evidence_markdown(args, report):
    pct = lambda s: "–" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    num = lambda s, f=".3f": "–" if s is None else format(s["mean"], f)  # noqa: E731
    diff = lambda d: f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f}"  # noqa: E731
    lines = [f"# Longtail Guidance vs unguided synthetic data: {report['dataset']}", "",
             f"Measured {report['date']} on {report['machine']}. {report['seeds']} seeds per arm; test top-1 accuracy "
             f"(%) after {report['pretrain_epochs']} real-only and {report['epochs']} fine-tuning epochs, mean ± std "
             "over seeds. Tail = the rarest third of the classes. Synthetic budget as a multiple of the real "
             f"(long-tailed) training set; generation rounds at fine-tuning epochs {report['schedule']}. "
             f"Signal: {report['signal']}{', w rescaled (w = guidance share of |eps|)' if report['rescale'] else ''}.",
             "", "Command: `python train_loop.py " + " ".join(sys.argv[1:]) + "`", "",
             "| arm | w | synthetic | overall | tail | LTG − unguided overall | LTG − unguided tail | "
             "mean signal | guidance ratio | judge acc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["arms"].items():
        d = r.get("minus_unguided")
        lines.append(f"| {name} | {r['w']:g} | x{r['synthetic']:g} | {pct(r['acc'])} | {pct(r['tail_acc'])} | "
                     f"{diff(d['acc']) if d else '–'} | {diff(d['tail_acc']) if d else '–'} | {num(r['signal'])} | "
                     f"{num(r['guidance_ratio'])} | {pct(r['judge_acc'])} |")
    lines += ["", "LTG − unguided: paired by seed (same seed, budget and schedule), mean ± standard error. Guidance "
              "ratio: |w sqrt(1 - abar) grad| / |eps| at the median guided step. Judge acc: the share of generated "
              "images a classifier trained on the balanced train split assigns to their intended class"
              + (f" (its own test accuracy: {100 * report['judge_test_acc']:.1f}%)." if "judge_test_acc" in report
                 else "."), ""]
    return "\n".join(lines)


def plot_comparison(path, report):
    names = list(report["arms"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("acc", "overall"), ("tail_acc", "tail (rarest third)"))):
        stats = [report["arms"][n][key] for n in names]
        ax.bar(x + (k - 0.5) * 0.38, [100 * s["mean"] for s in stats], 0.38, yerr=[100 * s["std"] for s in stats],
               capsize=3, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="test top-1 (%), mean ± std over seeds", ylim=(0, 100),
           title=f"{report['dataset']}: real only vs unguided vs LTG ({report['seeds']} seeds)")
    ax.legend(loc="lower right")
    write_figure(path, fig)


def plot_sweep(path, out, names, arms, seed=0, images=8):
    """Figure 1 of the paper: the same round-0 samples (same seed and predictor) at each w, one column per w."""
    names = sorted(names, key=lambda n: arms[n][0])
    fig, axes = plt.subplots(images, len(names), figsize=(1.3 * len(names), 1.3 * images), squeeze=False)
    for col, name in enumerate(names):
        rows = {r["index"]: r for r in read_jsonl(out / name / f"seed{seed}" / "synthetic" / "manifest.jsonl")
                if r["round"] == 0}
        for row in range(images):
            ax = axes[row, col]
            ax.axis("off")
            if row in rows:
                with Image.open(out / name / f"seed{seed}" / "synthetic" / rows[row]["file"]) as im:
                    ax.imshow(np.asarray(im), cmap="gray")
                ax.set_title(f"{rows[row]['signal']:.2f}", fontsize=7)
        axes[0, col].set_title(f"w={arms[name][0]:g}\n" + axes[0, col].get_title(), fontsize=8)
    fig.suptitle("the same samples at each guidance weight (title: longtail signal)", fontsize=9)
    write_figure(path, fig)


def plot_budgets(path, report):
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, w_zero in (("unguided", True), ("LTG", False)):
        rows = sorted((r for r in report["arms"].values() if r["synthetic"] > 0 and (r["w"] == 0) == w_zero
                       and (w_zero or r["w"] == report["guidance_weight"])), key=lambda r: r["synthetic"])
        for key, style in (("acc", "-"), ("tail_acc", "--")):
            ax.errorbar([r["synthetic"] for r in rows], [100 * r[key]["mean"] for r in rows],
                        [100 * r[key]["std"] for r in rows], ls=style, marker="o", capsize=3,
                        label=f"{kind} {'overall' if key == 'acc' else 'tail'}")
    budgets = sorted({r["synthetic"] for r in report["arms"].values() if r["synthetic"] > 0})
    ax.set(xscale="log", xlabel="synthetic budget (x the real training set)", ylabel="test top-1 (%)",
           title="data efficiency")
    ax.set_xticks(budgets, [f"x{b:g}" for b in budgets], minor=False)
    ax.minorticks_off()
    ax.legend()
    write_figure(path, fig)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.train_foundation:
        train_foundation(args)
        return
    if args.compare:
        run_evidence(parser, args)
        return
    try:
        run_cycle(parser, args)
    except introspect.IntrospectError as e:  # a failed VLM/LLM backend in the automatic mode
        sys.exit(f"{parser.prog}: error: introspection: {e}; nothing is lost: continue with --resume {args.out}")


if __name__ == "__main__":
    main()
