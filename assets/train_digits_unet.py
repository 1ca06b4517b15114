"""Trains the digits foundation model (assets/digits-unet), deterministically from --seed:

    python assets/train_digits_unet.py --seed 0          # 1000 steps, about 2 minutes on 2 CPU cores

A class-conditional DDPM on the whole balanced train split of scikit-learn's 8x8 digits (as Stable
Diffusion has seen plenty of every class), with label dropout to the null class 10 for
classifier-free guidance. 0.7M parameters; train_loop.py's digits default generates with it.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tasks.py, beside train_loop.py
import tasks  # noqa: E402

UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=11, norm_num_groups=8)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


def train(steps, seed, batch_size=128, lr=1e-3, label_dropout=0.1):
    """(UNet, scheduler) after `steps` steps of the epsilon-prediction loss; deterministic from `seed`."""
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    (x, y), _ = tasks.digits_split()
    x = x * 2 - 1                                                            # [N, 1, 8, 8] in [-1, 1]
    unet, scheduler = UNet2DModel(**UNET), DDIMScheduler(**SCHEDULER)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    null = UNET["num_class_embeds"] - 1
    for _ in tqdm(range(steps), desc="foundation"):
        i = torch.randint(len(y), (batch_size,), generator=g)
        labels = torch.where(torch.rand(batch_size, generator=g) < label_dropout, null, y[i])
        noise = torch.randn(batch_size, 1, 8, 8, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x[i], noise, t), t, class_labels=labels).sample, noise)
        tasks.fit_step(optimizer, loss)
    print(f"foundation model: {sum(p.numel() for p in unet.parameters()):,} parameters, final loss {loss.item():.4f}")
    return unet, scheduler


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads, fixed so reruns are bit-identical")
    p.add_argument("--out", default=str(tasks.DIGITS_UNET), help="where the diffusers folder is written")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    torch.set_num_threads(args.threads)
    unet, scheduler = train(args.steps, args.seed)
    unet.save_pretrained(args.out)       # config.json + diffusion_pytorch_model.safetensors
    scheduler.save_pretrained(args.out)  # scheduler_config.json beside it
    print(f"saved to {args.out}/")


if __name__ == "__main__":
    main()
