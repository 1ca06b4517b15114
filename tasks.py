"""What train_loop.py's cycle works on: real (image, label) data with the paper's augmentation, the
predictor with its Epistemic Head, the generator, the test metrics, and one optimisation step. The
embedded default is scikit-learn's 8x8 digits made long-tailed, with a tiny class-conditional diffusion
model; the paper's datasets come through torchvision (downloaded when missing) or, for ImageNet-LT,
from its list files, with Stable Diffusion.
"""

import functools
import shutil
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from diffusers import DDIMScheduler, UNet2DModel
from huggingface_hub import constants as hub
from torchvision import datasets, models
from torchvision.transforms import v2

import families
import livt
import ltg

DATASETS = ("digits", "flowers", "pets", "cars", "caltech101", "imagenet-lt")
TORCHVISION = {"flowers": datasets.Flowers102, "pets": datasets.OxfordIIITPet, "cars": datasets.StanfordCars,
               "caltech101": datasets.Caltech101}
# Where torchvision (0.29) fetches each dataset from: the first file it asks for, and the folder it makes.
DOWNLOADS = {"flowers": ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "flowers-102"),
             "pets": ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", "oxford-iiit-pet"),
             "caltech101": ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", "caltech101")}
PROMPTS = {"flowers": "a photo of a {}, a type of flower.", "pets": "a photo of a {}, a type of pet.",
           "cars": "a photo of a {}, a type of car.", "caltech101": "a photo of a {}.",
           "imagenet-lt": "a photo of a {}."}

MANY_SHOT, FEW_SHOT = 100, 20  # real training images: many-shot > 100, few-shot < 20, medium-shot between

# The embedded default: a fixed stratified split of the 1,797 digits, a balanced validation set and a
# long-tailed train subset from the training pool, and the digits foundation model (assets/train_digits_unet.py).
DIGITS_TEST_FRACTION, DIGITS_VAL_PER_CLASS, DIGITS_IMBALANCE = 0.4, 25, 30.0
DIGITS_UNET = Path(__file__).resolve().parent / "assets" / "digits-unet"


class TaskError(Exception):
    """The data and the flags do not fit together; the message is one line, meant for the user."""


class Unavailable(TaskError):
    """A dataset or model that is neither on disk nor fetchable: the message names the path, the URL and the flag."""


@dataclass
class Task:
    classes: list            # class names, index = label
    train: Dataset           # real training images with augmentation
    test: Dataset
    evals: dict              # evaluation-only sets, name -> Dataset
    train_labels: list       # label of each real training image (class counts, many/medium/few-shot groups)
    train_tf: v2.Compose     # the augmentation, also applied to synthetic images
    mode: str                # PIL mode of the images: "L" (digits) or "RGB"
    prompt: str | None       # per-class prompt template; None for the class-conditional digits model
    input_size: int = 224    # side of the predictor's (square) input
    val: Dataset | None = None       # validation images from the training pool: every choice is made on them
    judge: object = None     # () -> a classifier of the generated images (trained once, on first use), or None

    def preprocess(self, x):
        """Images [B, C, H, W] in [0, 1] -> the predictor's input, differentiably (for guidance)."""
        return (x - 0.5) / 0.5 if self.mode == "L" else imagenet_input(self.input_size)(x)


@functools.cache
def imagenet_input(size):
    """A decoded RGB image's way into an ImageNet-normalised classifier of input side `size` (built once)."""
    return ltg.predictor_preprocess(size)


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
        names = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
        return names, {n: int(n) if n.isdigit() else self.wnid_to_label[n] for n in names}

    @property
    def label_subset(self):
        """The labels of a set that covers only some ImageNet classes (ImageNet-A: 200), to score over those
        logits only, as is standard; None for a set of all 1,000 (ImageNet-V2)."""
        labels = sorted(set(self.class_to_idx.values()))
        return labels if len(labels) < len(self.wnid_to_label) else None


@torch.no_grad()
def evaluate(predictor, dataset, num_classes, device, workers=0, subset=None):
    """Per-class (correct, count) of the predictor's top-1 on a dataset: two int arrays [C]. subset: the
    labels to choose among (the argmax over those logits only), or None for all."""
    predictor.eval()
    correct, count = np.zeros(num_classes, int), np.zeros(num_classes, int)
    labels = torch.arange(num_classes) if subset is None else torch.tensor(subset)
    columns = labels.to(device)
    for x, y in DataLoader(dataset, batch_size=256, num_workers=workers):
        logits = predictor(x.to(device))[:, columns]                             # [B, C or |subset|]
        hit = (labels[logits.argmax(1).cpu()] == y).numpy()
        np.add.at(correct, y.numpy(), hit)
        np.add.at(count, y.numpy(), 1)
    return correct, count


def split_accuracy(correct, count, groups):
    """Top-1 overall, over each group of classes (None for a group without test images) and of the worst class."""
    metrics = dict(acc=float(correct.sum() / count.sum()))
    for name, classes in groups.items():
        n = count[classes].sum()
        metrics[f"{name}_acc"] = float(correct[classes].sum() / n) if n else None
    metrics["worst_acc"] = float((correct[count > 0] / count[count > 0]).min())
    return metrics


def set_metrics(predictor, dataset, groups, num_classes, device, workers, prefix=""):
    """split_accuracy and the per-class top-1 of one set, keys prefixed by the set's name."""
    correct, count = evaluate(predictor, dataset, num_classes, device, workers, getattr(dataset, "label_subset", None))
    metrics = split_accuracy(correct, count, groups) | dict(per_class_acc=(correct / np.maximum(count, 1)).round(6).tolist())
    return {prefix + k: v for k, v in metrics.items()}


def evaluation_metrics(predictor, task, groups, device, workers):
    """Top-1 on the test set (overall, per group of classes, worst class, per class), on the validation set
    (val_...) and on each evaluation-only set (<name>_...)."""
    C = len(task.classes)
    metrics = set_metrics(predictor, task.test, groups, C, device, workers)
    sets = ({"val": task.val} if task.val is not None else {}) | task.evals
    for name, dataset in sets.items():
        metrics |= set_metrics(predictor, dataset, groups, C, device, workers, prefix=f"{name}_")
    return metrics


def weakest_classes(per_class_acc):
    """The weakest third of the classes by (validation) top-1, ties to the lower label: the "hard" group."""
    C = len(per_class_acc)
    return sorted(np.argsort(per_class_acc, kind="stable")[:max(1, round(C / 3))].tolist())


def load_task(args):
    if args.dataset == "digits":
        return digits_task(args.imbalance, class_order(args.class_order, 10))
    transforms = livt.transforms(args.input_size) if args.augment == "randaugment" else paper_transforms(args.input_size)
    if args.dataset == "imagenet-lt":
        return imagenet_lt_task(args.data_root, args.eval_set, transforms, args.input_size)
    return torchvision_task(args.dataset, args.data_root, args.download, transforms, args.input_size)


def class_groups(labels, num_classes, rarest_third=False):
    """The classes by their number of real training images, as the long-tail field splits them (Liu et al.,
    "Large-Scale Long-Tailed Recognition in an Open World", 2019): many-shot (> 100), medium-shot (20-100),
    few-shot (< 20); and, where asked, the rarest third of the classes ("tail", the digits' figure)."""
    counts = np.bincount(labels, minlength=num_classes)
    groups = dict(many=np.flatnonzero(counts > MANY_SHOT).tolist(),
                  medium=np.flatnonzero((counts >= FEW_SHOT) & (counts <= MANY_SHOT)).tolist(),
                  few=np.flatnonzero(counts < FEW_SHOT).tolist())
    if rarest_third:
        groups["tail"] = sorted(np.argsort(counts, kind="stable")[:max(1, round(num_classes / 3))].tolist())
    return groups


# ---------------------------------------------------------------------------------------------
# The embedded default: 8x8 digits.
# ---------------------------------------------------------------------------------------------

def digits_split(seed=0):
    """scikit-learn's 1,797 8x8 digits as (x [N, 1, 8, 8] in [0, 1], y [N]), split into a fixed stratified
    train and test set."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
                                   random_state=seed)
    return (x[train], y[train]), (x[test], y[test])


def validation_split(y, per_class):
    """(pool, validation) indices: the last `per_class` images of every class are the (balanced) validation set."""
    val = torch.cat([torch.nonzero(y == c).flatten()[-per_class:] for c in range(int(y.max()) + 1)])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val.sort().values


def long_tailed(y, imbalance, order=None):
    """Indices of a long-tailed subset: the i-th class of `order` (default 0, 1, ...) keeps
    n_max * imbalance^(-i / (C - 1)) of its images (an exponential profile from order[0], the most common,
    to order[-1], the rarest)."""
    classes = int(y.max()) + 1
    order = list(range(classes)) if order is None else order
    n_max = int(torch.bincount(y).min())
    keep = [torch.nonzero(y == c).flatten()[:round(n_max * imbalance ** (-i / (classes - 1)))]
            for i, c in enumerate(order)]
    return torch.cat(keep).sort().values


def class_order(spec, num_classes):
    """--class-order: None (0, 1, ..., most to least common), a seed ("3": a random permutation drawn from it),
    or a permutation ("9,8,...,0"). Raises ValueError, naming what is accepted."""
    if spec is None:
        return list(range(num_classes))
    if spec.strip().isdigit():
        return np.random.default_rng(int(spec)).permutation(num_classes).tolist()
    try:
        order = [int(c) for c in spec.split(",")]
    except ValueError:
        order = []
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"expected a seed (e.g. 1) or a permutation of 0..{num_classes - 1} (e.g. "
                         f"{','.join(map(str, reversed(range(num_classes))))}), most common class first")
    return order


def shifted_digits(x, seed=0):
    """The digits' distribution-shift set (the analogue of ImageNet-A/V2): each image [N, 1, 8, 8] rotated by
    10-25 degrees either way, scaled by 0.8-1.2 and its strokes thinned or thickened (a blend towards a 3x3
    erosion or dilation of up to one half), all drawn from `seed`, so the set is the same everywhere."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    angle = (10 + 15 * torch.rand(n, generator=g)) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    scale = 0.8 + 0.4 * torch.rand(n, generator=g)
    stroke = torch.rand(n, generator=g) - 0.5                                # < 0 thinner, > 0 thicker
    moved = torch.stack([v2.functional.affine(im, angle=a.item(), translate=[0, 0], scale=s.item(), shear=[0.0],
                                              interpolation=v2.InterpolationMode.BILINEAR)
                         for im, a, s in zip(x, angle, scale)])              # [N, 1, 8, 8]
    dilated, eroded = F.max_pool2d(moved, 3, 1, 1), -F.max_pool2d(-moved, 3, 1, 1)
    target = torch.where(stroke[:, None, None, None] > 0, dilated, eroded)
    return (moved + stroke.abs()[:, None, None, None] * (target - moved)).clamp(0, 1)


def digits_transforms():
    """A scaled-down version of the paper's augmentation: rotation 15, crops with 1 px padding, no flips."""
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    normalize = v2.Normalize([0.5], [0.5])
    return (v2.Compose(to_float + [v2.RandomRotation(15), v2.RandomCrop(8, padding=1), normalize]),
            v2.Compose(to_float + [normalize]))


def digits_task(imbalance=DIGITS_IMBALANCE, order=None):
    """The digits: a long-tailed train subset (`imbalance`, `order`) and a balanced validation set from the
    training pool; the fixed test split, clean and shifted (evals["shifted"]); the judge of generated digits."""
    (x, y), (x_test, y_test) = digits_split()
    pool, val = validation_split(y, DIGITS_VAL_PER_CLASS)
    subset = pool[long_tailed(y[pool], imbalance, order)]
    train_tf, test_tf = digits_transforms()
    labels = y[subset].tolist()
    shifted = Images(shifted_digits(x_test), y_test.tolist(), test_tf)
    return Task([str(c) for c in range(10)], Images(x[subset], labels, train_tf), Images(x_test, y_test.tolist(), test_tf),
                {"shifted": shifted}, labels, train_tf, "L", None, val=Images(x[val], y[val].tolist(), test_tf),
                judge=digits_judge)


@functools.cache
def digits_judge(epochs=30, seed=0):
    """An independent classifier of generated digits: the small CNN trained on the balanced training pool (the
    foundation model's data, validation set held out) with the predictor's augmentation; deterministic, trained
    once per process (about 10 s)."""
    (x, y), _ = digits_split()
    pool, _ = validation_split(y, DIGITS_VAL_PER_CLASS)
    train_tf, _ = digits_transforms()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)
        judge = small_cnn(10)
        optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
        for _ in range(epochs):
            for i in pool[torch.randperm(len(pool), generator=g)].split(64):
                fit_step(optimizer, F.cross_entropy(judge(torch.stack([train_tf(im) for im in x[i]])), y[i]))
    return judge.eval()


def small_cnn(num_classes, channels=1):
    """The digits predictor: 8x8 input, 64 penultimate features."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # [B, 32 * 4 * 4]
        nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, num_classes))                  # h [B, 64] -> [B, C]


def is_architecture(arch):
    return arch == "cnn" or arch in models.list_models(module=models) or livt.is_timm_arch(arch)


def build_predictor(args, num_classes, channels):
    """--arch from scratch: 'cnn' (the digits predictor), a torchvision classifier or a timm ViT by name."""
    if args.arch == "cnn":
        return small_cnn(num_classes, channels)
    if args.arch in models.list_models(module=models):
        return models.get_model(args.arch, weights=None, num_classes=num_classes)
    try:
        return livt.create_vit(args.arch, num_classes, args.input_size, args.drop_path)
    except ValueError as e:  # a timm name that is not a ViT
        raise TaskError(str(e)) from None


def build_head(args, num_classes, channels):
    """The predictor (--arch), from scratch, wrapped by the Epistemic Head (K logits per input)."""
    return ltg.EpistemicHead(build_predictor(args, num_classes, channels), args.head_samples, args.head, seed=args.seed)


def predictor_loss(args, train_labels, num_classes):
    """The predictor's loss (logits [B, C], labels [B] or class probabilities [B, C] from mixup): cross entropy,
    or LiVT's balanced BCE (logits shifted by the log prior odds of the real training set). Label smoothing
    is mixup's when mixup is on."""
    smoothing = 0.0 if args.mixup else args.smoothing
    if args.loss == "ce":
        return functools.partial(F.cross_entropy, label_smoothing=smoothing)
    counts = np.bincount(train_labels, minlength=num_classes)
    if not counts.all():
        raise TaskError(f"--loss bal-bce needs a training image of every class (its bias is the log prior odds); "
                        f"{int((counts == 0).sum())} of {num_classes} classes have none, e.g. class "
                        f"{int(np.argmin(counts))}: use --loss ce")
    return functools.partial(livt.balanced_bce, class_counts=torch.tensor(counts, dtype=torch.float32), smoothing=smoothing)


class Learner(nn.Module):
    """Predictor and head as one module, so DistributedDataParallel sees a single forward. The head's loss
    (cross entropy over its K members) reaches the head only (stop-gradient features), `criterion` the predictor."""

    def __init__(self, head, criterion=F.cross_entropy):
        super().__init__()
        self.head, self.criterion = head, criterion

    def forward(self, x, y):                                                # x [B, C, H, W], y [B] or [B, classes]
        h, mu = self.head.features_and_logits(x)                            # [B, F], [B, classes]
        return self.criterion(mu, y) + self.head.loss(h, mu, y)


def fit_step(optimizer, loss):
    """One gradient step on `loss`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------
# The generators: the digits foundation model, or a Stable Diffusion pipeline.
# ---------------------------------------------------------------------------------------------

def load_from(flag, path_or_id, load, hint=""):
    """load(path_or_id); a folder or hub id that cannot be loaded is one line naming it, the URL tried and the flag."""
    try:
        return load(path_or_id)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(path_or_id).exists():
            raise Unavailable(f"{flag} {path_or_id}: cannot load it ({reason}){hint}") from None
        raise Unavailable(f"{flag} {path_or_id}: not a local folder, not in the Hugging Face cache ({hub.HF_HUB_CACHE}), "
                          f"and {hub.ENDPOINT}/{path_or_id} could not be fetched ({reason}); on a machine without "
                          f"internet pass {flag} /path/to/a/local/copy") from None


def load_diffusion(args, device):
    """(model, scheduler, guidance decoder): the digits UNet and its scheduler, or a diffusers text-to-image pipeline
    of any supported family (its own scheduler; on a GPU in the family's dtype) and the optional cheaper decoder
    for the guidance pass."""
    if args.dataset == "digits":
        unet = load_from("--diffusion", args.diffusion, UNet2DModel.from_pretrained,
                         hint="; retrain it with python assets/train_digits_unet.py").to(device).eval()
        return unet, DDIMScheduler.from_pretrained(args.diffusion), None
    family = load_from("--diffusion", args.diffusion, families.family_of)
    if args.guidance_decoder:
        guidance_decoder_check(args, lambda: families.check_tiny_decoder_id(family, args.guidance_decoder))
    dtype = family.cuda_dtype if device.type == "cuda" else torch.float32
    pipe = load_from("--diffusion", args.diffusion, lambda p: families.load_pipeline(p, device, dtype))
    if not args.guidance_decoder:
        return pipe, None, None
    decoder = load_from("--guidance-decoder", args.guidance_decoder,
                        lambda p: families.load_guidance_decoder(p, device, dtype))
    guidance_decoder_check(args, lambda: families.check_guidance_decoder(pipe.vae, decoder))
    return pipe, None, decoder


def guidance_decoder_check(args, check):
    """check(), its ValueError as a one-line TaskError naming --guidance-decoder once."""
    try:
        check()
    except ValueError as e:
        message = str(e).removeprefix("ltg: ").removeprefix(f"{args.guidance_decoder} ")
        raise TaskError(f"--guidance-decoder {args.guidance_decoder}: {message}") from None


# ---------------------------------------------------------------------------------------------
# The paper's datasets.
# ---------------------------------------------------------------------------------------------

def paper_transforms(size=224):
    """The paper's augmentation: random rotation (15 degrees), size x size crops, horizontal flips."""
    head = [v2.RGB(), v2.ToImage()]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(ltg.IMAGENET_MEAN, ltg.IMAGENET_STD)]
    train = v2.Compose(head + [v2.RandomResizedCrop(size), v2.RandomRotation(15), v2.RandomHorizontalFlip()] + tail)
    test = v2.Compose(head + [v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)] + tail)
    return train, test


def torchvision_splits(name, root, transforms, download):
    """The (train, test) datasets of a torchvision dataset class, one transform each."""
    cls = TORCHVISION[name]
    if name == "caltech101":  # one set of all images; split below
        return [cls(root, transform=tf, download=download) for tf in transforms]
    splits = ("trainval", "test") if name == "pets" else ("train", "test")
    return [cls(root, split, transform=tf, download=download) for split, tf in zip(splits, transforms)]


def download_splits(name, root, transforms):
    """torchvision_splits with download=True; on failure, what the attempt created is removed and the
    Unavailable message names the folder, the URL and the flags."""
    url, base = DOWNLOADS[name]
    made = [p for p in (Path(root), Path(root) / base) if not p.exists()]
    try:
        return torchvision_splits(name, root, transforms, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        reason = getattr(e, "reason", None) or e
        raise Unavailable(f"could not download {TORCHVISION[name].__name__} from {url} into "
                          f"{(Path(root) / base).resolve()} ({reason}); on a machine without internet put the "
                          "files there by hand and pass --no-download, or point --data-root at a copy") from None


def open_torchvision(name, root, transforms, download):
    """The dataset's (train, test) from --data-root, downloaded first when missing (unless --no-download)."""
    try:
        return torchvision_splits(name, root, transforms, download=False)
    except RuntimeError as e:
        if name == "cars":
            raise Unavailable(f"no StanfordCars data under {Path(root).resolve()} ({e}); torchvision cannot download "
                              "it any more: place it there by hand") from None
        if download:
            return download_splits(name, root, transforms)
        url, base = DOWNLOADS[name]
        raise Unavailable(f"no {TORCHVISION[name].__name__} data under {(Path(root) / base).resolve()} (--no-download); "
                          f"drop --no-download to fetch it from {url}, or point --data-root at a copy") from None


def torchvision_task(name, root, download, transforms, input_size):
    """Flowers102, OxfordIIITPet, StanfordCars or Caltech101 through torchvision."""
    train_tf, test_tf = transforms
    train, test = open_torchvision(name, root, (train_tf, test_tf), download)
    val = datasets.Flowers102(root, "val", transform=test_tf) if name == "flowers" else None  # the official split
    if name == "caltech101":  # no official split: a fixed stratified 80/20 split of all images
        train_idx, test_idx = train_test_split(np.arange(len(train.y)), test_size=0.2, stratify=train.y, random_state=0)
        classes, labels = train.categories, [train.y[i] for i in train_idx]
        train, test = Subset(train, train_idx), Subset(test, test_idx)
    else:
        classes = train.classes
        # the label lists torchvision keeps (reading them through __getitem__ would decode every image)
        labels = list(train._labels) if hasattr(train, "_labels") else [c for _, c in train._samples]
    return Task(list(classes), train, test, {}, labels, train_tf, "RGB", PROMPTS[name], input_size, val=val)


def imagenet_lt_task(root, eval_sets, transforms, input_size):
    """ImageNet-LT from its list files in --data-root (lines 'train/n01440764/x.JPEG 0'), read image by image
    (nothing held in memory), its validation list when there is one, plus evaluation-only sets (ImageNet-V2,
    ImageNet-A) from local folders."""
    train_tf, test_tf = transforms
    lists = {}
    for split in ("train", "test", "val"):
        path = Path(root) / f"ImageNet_LT_{split}.txt"
        if split == "val" and not path.is_file():
            continue
        if not path.is_file():
            raise Unavailable(f"no ImageNet-LT list {path.resolve()}; ImageNet-LT cannot be downloaded: put the "
                              "ImageNet images and ImageNet_LT_{train,test}.txt under --data-root")
        lists[split] = [line.split() for line in path.read_text().splitlines() if line.strip()]
    wnid_to_label = {Path(f).parent.name: int(label) for f, label in lists["train"]}
    train, test, val = (Images([Path(root) / f for f, _ in lists[s]], [int(c) for _, c in lists[s]], tf) if s in lists
                        else None for s, tf in (("train", train_tf), ("test", test_tf), ("val", test_tf)))
    evals = {}
    for spec in eval_sets:
        name, folder = spec.split("=", 1)
        if not Path(folder).is_dir():
            raise Unavailable(f"no {name} images under {Path(folder).resolve()} (--eval-set {spec}); "
                              "it cannot be downloaded by torchvision: point --eval-set at a local copy")
        evals[name] = ImageNetFolder(folder, wnid_to_label, test_tf)
    classes = models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return Task(classes, train, test, evals, train.labels, train_tf, "RGB", PROMPTS["imagenet-lt"], input_size, val=val)
