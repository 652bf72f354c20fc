"""dpdit's acceptance run on one GPU, with nothing downloaded (about 8 minutes on one large GPU):

1. DiT-XL/2 as `facebook/DiT-XL-2-256` publishes it, with random weights (built once,
   `dpdit.models.published`): the DP training step of every clipping mode against the
   non-private step (`python -m dpdit.profile`), in float32 and bf16-mixed at physical batch
   8, and the largest physical batch that fits for book-keeping in bf16-mixed;
2. 50 DP steps of `train.py` fine-tuning that pipeline (its VAE encoding the images) with
   `model.finetune=lora` and `full` in bf16-mixed: epsilon, steps/s, peak memory, last loss;
3. 200 DP steps of `train.py` with `model=dit_s_2` on 32 px font digits.

    python scripts/gpu_acceptance.py --output acceptance
    python scripts/gpu_acceptance.py --cpu-smoke --output /tmp/smoke   # tiny sizes, CPU, < 1 min

Writes `acceptance.json` (every record) and `acceptance.md` (the tables) in --output. The
random weights measure time and memory at the real size; their samples are noise.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dpdit.cli import CONFIG_DIR
from dpdit.models.published import DIT_XL_2_256, SD_VAE_FT_EMA, save_random_pipeline
from dpdit.profile import GIB, find_max_batch, run_profile
from dpdit.train import train

# The smoke run's pipeline: XL/2's kind of model (adaLN-Zero, learned sigma, attention
# bias, tanh GELU) at 2 blocks of width 32 on 8x8x4 latents, and a VAE for 16 px images.
TINY_TRANSFORMER = {
    **DIT_XL_2_256,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "sample_size": 8,
}
TINY_VAE = {
    **SD_VAE_FT_EMA,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}

# What each part runs, at the real size and in the smoke run.
SIZES = {
    "gpu": {
        "pipeline": (DIT_XL_2_256, SD_VAE_FT_EMA),
        "latent_size": 32,
        "image_size": 256,
        "modes": {
            "32-true": ["vanilla", "bookkeeping", "ghost", "hooks", "functorch"],
            "bf16-mixed": ["vanilla", "bookkeeping", "hooks"],
        },
        "profile_batch": 8,
        "profile": ["profile.warmup=2", "profile.num_iter=5"],
        "max_batch": ["profile.first_batch=64", "profile.batch_multiple=32", "profile.max_batch=2048"],
        "finetune_steps": 50,
        "finetune_data": ["data.size=512", "data.batch_size=64", "data.physical_batch_size=32"],
        "small_model": ["model=dit_s_2"],
        "small_steps": 200,
        "small_data": ["data.batch_size=256", "data.physical_batch_size=256"],
        "timed_warmup": 5,
        "precision": "bf16-mixed",
        "device": [],
    },
    "cpu-smoke": {
        "pipeline": (TINY_TRANSFORMER, TINY_VAE),
        "latent_size": 8,
        "image_size": 16,
        "modes": {"32-true": ["vanilla", "bookkeeping"], "bf16-mixed": ["bookkeeping"]},
        "profile_batch": 2,
        "profile": ["profile.warmup=1", "profile.num_iter=1"],
        "max_batch": ["profile.first_batch=2", "profile.max_batch=2", "profile.memory_limit_gib=64"],
        "finetune_steps": 2,
        "finetune_data": ["data.size=16", "data.batch_size=4", "data.physical_batch_size=4"],
        "small_model": ["model=dit_s_2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2"],
        "small_steps": 3,
        "small_data": ["data.size=200", "data.batch_size=16", "data.physical_batch_size=16"],
        "timed_warmup": 1,
        "precision": "bf16-mixed",
        "device": ["trainer.accelerator=cpu"],
    },
}
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]


def configuration(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def command_line(name: str, overrides: list[str]) -> str:
    """The command a user types for the same run."""
    program = "python train.py" if name == "train" else f"python -m dpdit.{name}"
    return " ".join([program, *(f"'{o}'" if any(c in o for c in "[]{}$ ") else o for o in overrides)])


def profile_records(pipeline: Path, size: dict, output: Path) -> list[dict[str, Any]]:
    """Each mode against vanilla per precision, then book-keeping's largest batch."""
    model = [
        "model=pretrained",
        f"model.name_or_path={pipeline}",
        "model.vae_name_or_path=null",
        "prior=none",
        *size["device"],
    ]
    data = ["data.image_size=" + str(size["latent_size"]), "data.channels=4"]
    records = []
    for precision, modes in size["modes"].items():
        overrides = [
            *model,
            *data,
            f"trainer.precision={precision}",
            f"profile.modes=[{','.join(modes)}]",
            f"profile.batch_sizes=[{size['profile_batch']}]",
            *size["profile"],
            f"paths.output_dir={output / ('profile_' + precision)}",
        ]
        results = run_profile(configuration("profile", overrides))
        for record in results["records"]:
            records.append(
                {
                    "part": "profile",
                    "precision": precision,
                    "command": command_line("profile", overrides),
                    **summarise(record),
                }
            )
    overrides = [
        *model,
        *data,
        f"trainer.precision={size['precision']}",
        *size["max_batch"],
        f"paths.output_dir={output / 'max_batch'}",
    ]
    found = find_max_batch(OmegaConf.to_container(configuration("profile", overrides), resolve=True), "bookkeeping")
    records.append(
        {
            "part": "max_batch",
            "precision": size["precision"],
            "mode": "bookkeeping",
            "batch_size": found["batch_size"],
            "tries": found["tries"],
            "command": command_line(
                "profile", [*overrides, "profile.find_max_batch=true", "profile.modes=[bookkeeping]"]
            ),
        }
    )
    return records


def summarise(record: dict[str, Any]) -> dict[str, Any]:
    kept = {
        key: record.get(key)
        for key in ("mode", "batch_size", "status", "error", "median_step_s", "images_per_s", "vs_vanilla")
    }
    kept["peak_bytes"] = record.get("memory", {}).get("peak_bytes")
    return kept


def training_record(name: str, overrides: list[str], output: Path, warmup: int) -> dict[str, Any]:
    """One `train.py` run in this process, timed by the profiler's step timer."""
    timer = output / "step_times.json"
    overrides = [
        *overrides,
        *QUIET,
        # the exact loss, to check it stays finite (a benchmark on synthetic data)
        "privacy.statistics=nonprivate",
        f"paths.output_dir={output}",
        f"paths.data_dir={output.parent / 'data'}",
        "+callbacks.step_timer._target_=dpdit.profile.StepTimer",
        f"+callbacks.step_timer.warmup={warmup}",
        f"+callbacks.step_timer.output_file={timer}",
    ]
    started = time.perf_counter()
    report = train(configuration("train", overrides))
    wall = time.perf_counter() - started
    steps = json.loads(timer.read_text())
    with open(next(output.glob("csv/*/metrics.csv"))) as metrics:
        losses = [float(row["train/loss"]) for row in csv.DictReader(metrics) if row.get("train/loss")]
    peak = (
        steps["cuda_max_allocated_bytes"] if steps["cuda_max_allocated_bytes"] is not None else steps["rss_peak_bytes"]
    )
    release_memory()
    return {
        "part": "train",
        "name": name,
        "epsilon": report.get("epsilon"),
        "steps": report.get("steps"),
        "steps_per_s": 1.0 / steps["median_step_s"],
        "median_step_s": steps["median_step_s"],
        "peak_bytes": peak,
        "last_loss": losses[-1],
        "loss_finite": all(math.isfinite(loss) for loss in losses),
        "wall_s": wall,
        "command": command_line("train", overrides),
    }


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next run's step timer resets the peak itself


def training_records(pipeline: Path, size: dict, output: Path) -> list[dict[str, Any]]:
    records = []
    for finetune in ("lora", "full"):
        overrides = [
            "model=pretrained",
            f"model.name_or_path={pipeline}",
            f"model.vae_name_or_path={pipeline}",
            "prior=none",
            "data=fake",
            f"data.image_size={size['image_size']}",
            "data.channels=3",
            *size["finetune_data"],
            f"model.finetune={finetune}",
            f"trainer.precision={size['precision']}",
            f"trainer.max_steps={size['finetune_steps']}",
            "sample.num_per_class=1",
            "sample.steps=5",
            *size["device"],
        ]
        records.append(
            training_record(
                f"pretrained XL/2, finetune={finetune}", overrides, output / f"train_{finetune}", size["timed_warmup"]
            )
        )
    overrides = [
        *size["small_model"],
        "data=font_digits",
        "data.image_size=32",
        "prior=none",
        *size["small_data"],
        f"trainer.max_steps={size['small_steps']}",
        "sample.num_per_class=2",
        "sample.steps=10",
        *size["device"],
    ]
    records.append(
        training_record("dit_s_2, font digits 32 px", overrides, output / "train_dit_s_2", size["timed_warmup"])
    )
    return records


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# dpdit acceptance ({result['device']}, {result['size']})", ""]
    lines += [
        "| precision | mode | batch | step (s) | images/s | peak (GiB) | time vs vanilla | memory vs vanilla |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["records"]:
        if r["part"] == "profile" and r["status"] == "ok":
            ratio = r["vs_vanilla"] or {}
            times, memory = (f"{ratio[key]:.2f}x" if key in ratio else "-" for key in ("step_time", "peak_memory"))
            lines.append(
                f"| {r['precision']} | {r['mode']} | {r['batch_size']} | "
                f"{r['median_step_s']:.3f} | {r['images_per_s']:.1f} | "
                f"{gib(r['peak_bytes'])} | {times} | {memory} |"
            )
        elif r["part"] == "profile":
            lines.append(
                f"| {r['precision']} | {r['mode']} | {r['batch_size']} | {r['status']}: {r['error']} | | | | |"
            )
        elif r["part"] == "max_batch":
            lines.append(f"| {r['precision']} | {r['mode']} | largest that fits: {r['batch_size']} | | | | | |")
    lines += [
        "",
        "| run | epsilon | steps | steps/s | peak (GiB) | last loss | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["records"]:
        if r["part"] == "train":
            epsilon = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
            lines.append(
                f"| {r['name']} | {epsilon} | {r['steps']} | {r['steps_per_s']:.2f} | {gib(r['peak_bytes'])} | "
                f"{r['last_loss']:.4f} | {r['wall_s']:.0f} |"
            )
    lines += ["", "Commands:", ""] + [f"    {c}" for c in dict.fromkeys(r["command"] for r in result["records"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for acceptance.json, acceptance.md and the runs")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks that every part runs")
    parser.add_argument(
        "--pipeline", help="where the random pipeline is built once (default: <cache>/published/<size>)"
    )
    args = parser.parse_args()
    size_name = "cpu-smoke" if args.cpu_smoke else "gpu"
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit(
            "gpu_acceptance: no GPU is visible; run it on a GPU machine, or add --cpu-smoke for the tiny CPU check"
        )
    size = SIZES[size_name]
    output = Path(args.output).resolve()
    if (output / "acceptance.json").exists():
        sys.exit(f"gpu_acceptance: {output} already holds an acceptance run; choose a new --output")
    output.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("DPDIT_CACHE", Path.home() / ".cache" / "dpdit"))
    started = time.perf_counter()
    transformer, vae = size["pipeline"]
    pipeline = save_random_pipeline(
        args.pipeline or cache / "published" / f"dit-xl-2-256-random-{size_name}", transformer=transformer, vae=vae
    )
    built = time.perf_counter() - started
    records = profile_records(pipeline, size, output) + training_records(pipeline, size, output)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_smoke else "CPU"
    result = {
        "size": size_name,
        "device": device,
        "pipeline": str(pipeline),
        "pipeline_s": built,
        "total_s": time.perf_counter() - started,
        "records": records,
    }
    (output / "acceptance.json").write_text(json.dumps(result, indent=2))
    (output / "acceptance.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
