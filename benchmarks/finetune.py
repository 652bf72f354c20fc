"""Step time and peak memory of DP fine-tuning a diffusers DiT, against privacy=none.

    python benchmarks/finetune.py                        # facebook/DiT-XL-2-256 (cached weights)
    python benchmarks/finetune.py --model random-xl      # DiT-XL/2's shape, random weights
    python benchmarks/finetune.py --model small --device cpu   # a random 4-block DiT
    python benchmarks/finetune.py --model random-xl --precision bf16-mixed   # bf16 autocast

Every (privacy, finetune) setting runs in its own process on random latents through the
training step dpdit uses (per-sample loss, Opacus clipping and noise, Adam); the step time
is the median over `--steps` steps after `--warmup`. The peak memory is CUDA's peak
allocation (weights included) or, on the CPU, how far the process's peak resident set
rose above its size before the first step. Prints a Markdown table with
each setting's ratios to privacy=none with the same trained parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

# ImageNet classes, so that `finetune` alone decides what is trained
LABELS = {"num_classes": 10, "labels": "imagenet", "class_ids": list(range(10))}
# Randomly initialised stand-ins: time and memory do not depend on the weights.
RANDOM_MODELS = {
    "small": {"num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 4, "sample_size": 16, "out_channels": 8},
    "random-xl": {"out_channels": 8},  # DiT-XL/2 at 256x256 (32x32x4 latents)
}
SETTINGS = [(privacy, finetune) for finetune in ("full", "attention") for privacy in ("none", "hooks", "ghost")]


def build_model(name: str, finetune: str):
    from diffusers import DiTTransformer2DModel

    from dpdit.models import PretrainedDiT

    torch.manual_seed(0)
    if name in RANDOM_MODELS:
        return PretrainedDiT(DiTTransformer2DModel(**RANDOM_MODELS[name]), finetune=finetune, **LABELS)
    return PretrainedDiT.from_pretrained(name, finetune=finetune, **LABELS)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class ManualBackward:
    """Stands in for the Lightning module's manual_backward."""

    @staticmethod
    def manual_backward(loss: torch.Tensor) -> None:
        loss.backward()


def measure(name: str, privacy_mode: str, finetune: str, batch_size: int, steps: int, warmup: int, device: str, precision: str) -> dict:
    from dpdit.diffusion import GaussianDiffusion
    from dpdit.privacy import DPSGDTraining, NonPrivateTraining, PrivacyConfig, full_precision

    model = build_model(name, finetune).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if privacy_mode == "none":
        privacy = NonPrivateTraining(batch_size)
    else:
        config = PrivacyConfig(clipping=privacy_mode, noise_multiplier=1.0)
        privacy = DPSGDTraining(config, sample_rate=batch_size / 10_000, dataset_size=10_000, noise_multiplier=1.0)
    optimizer = privacy.prepare(model, torch.optim.Adam(trainable, lr=1e-4))
    diffusion = GaussianDiffusion(clip_sample=False)
    shape = (batch_size, model.in_channels, model.input_size, model.input_size)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resident_before = resident_bytes()
    for step in range(warmup + steps):
        latents = torch.randn(shape, device=device)
        labels = torch.randint(0, model.num_classes, (batch_size,), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        # as in Lightning: forward and backward under autocast, the DP step outside it
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = diffusion.training_losses(model, latents, labels)
            privacy.backward(ManualBackward, loss)
        with full_precision(torch.device(device)):
            optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident_before
    return {
        "privacy": privacy_mode,
        "finetune": finetune,
        "trainable": sum(p.numel() for p in trainable),
        "step_s": statistics.median(times),
        "peak_gib": peak / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="facebook/DiT-XL-2-256", help="hub id, local folder, 'random-xl' or 'small'")
    parser.add_argument("--batch-size", type=int, default=8, help="physical batch per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        privacy_mode, finetune = args.one.split(",")
        print(json.dumps(measure(args.model, privacy_mode, finetune, args.batch_size, args.steps, args.warmup, args.device, args.precision)))
        return
    rows = []
    # ghost clipping is refused under bf16-mixed (dpdit.privacy.check_precision)
    settings = [(p, f) for p, f in SETTINGS if not (args.precision == "bf16-mixed" and p == "ghost")]
    for privacy_mode, finetune in settings:
        command = [sys.executable, __file__, "--one", f"{privacy_mode},{finetune}", *sys.argv[1:]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    baseline = {row["finetune"]: row for row in rows if row["privacy"] == "none"}
    print(f"model {args.model}, physical batch {args.batch_size}, {args.device}, {args.precision}, median of {args.steps} steps\n")
    memory = "peak memory (GiB)" if args.device == "cuda" else "peak RSS growth (GiB)"
    print(f"| finetune | privacy | trained parameters | step time (s) | vs none | {memory} | vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = baseline[row["finetune"]]
        print(
            f"| {row['finetune']} | {row['privacy']} | {row['trainable']:,} | {row['step_s']:.4f} | "
            f"{row['step_s'] / base['step_s']:.2f}x | {row['peak_gib']:.2f} | {row['peak_gib'] / base['peak_gib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
