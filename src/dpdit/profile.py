"""`python -m dpdit.profile`: what a DP training step costs in each clipping mode.

For every mode in `profile.modes` (`vanilla`, the non-private step, and the
`privacy.clipping` modes) and every physical batch size, the real training step (the
Lightning module, optimizer, EMA and, under DP, clipping and noise) runs on synthetic data of
the model's input shape in a fresh process, so that one mode's memory cannot hide another's.
Reported: the median step time after warm-up, images per second and the peak memory (GPU:
the allocator's peak allocated and reserved bytes; CPU: the process's peak resident memory
above what it held before the model was built), each as a ratio to `vanilla`.
`profile.find_max_batch` finds each mode's largest physical batch that fits.

Writes `profile.json` (one record per measurement, with the configuration, device, library
versions and raw step times) and `profile.png` to the run directory and prints a table.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from dpdit.bisection import last_fitting
from dpdit.build import make_module, make_trainer
from dpdit.cli import ConfigError, command, settings_checked
from dpdit.memory import DoesNotFit, check_memory_fits
from dpdit.module import DiffusionModule
from dpdit.privacy import (
    CLIPPING_MODES,
    DPSGD,
    VANILLA,
    Mechanism,
    NonPrivate,
    PrivacyConfig,
    check_dp_node,
    check_model_is_private,
    check_precision,
)

MODES = (VANILLA, *CLIPPING_MODES)
GIB = 2**30
LIBRARIES = ("torch", "opacus", "lightning", "diffusers", "dpdit")


#################################################################################
#                          Inside one measuring process                         #
#################################################################################


def resident_bytes(field: str = "VmRSS") -> int | None:
    """The process's resident memory (`VmRSS`) or its high-water mark (`VmHWM`), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_resident_peak() -> None:
    """Restart the high-water mark from the current resident memory (Linux >= 4.0), so that
    the peak covers the timed steps only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class StepTimer(L.Callback):
    """Wall time of each training step after `warmup` steps (of `timed` steps, if given), and
    the peak memory over them.
    With `output_file`, the times and peaks are written there when training ends: a training
    run measures itself with `+callbacks.step_timer._target_=dpdit.profile.StepTimer
    +callbacks.step_timer.warmup=5 +callbacks.step_timer.output_file=<path>`."""

    def __init__(self, warmup: int, output_file: str | None = None, timed: int | None = None):
        self.warmup = warmup
        self.timed = timed  # None: every step after the warm-up
        self.output_file = output_file
        self.step_times: list[float] = []
        self.peak: dict[str, int | None] = {}

    @staticmethod
    def _synchronize(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._synchronize(module.device)
        if batch_idx == self.warmup:
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)
            reset_resident_peak()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._synchronize(module.device)
        if batch_idx < self.warmup or (self.timed is not None and batch_idx >= self.warmup + self.timed):
            return
        self.step_times.append(time.perf_counter() - self._start)
        cuda = module.device.type == "cuda"
        self.peak = {
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(module.device) if cuda else None,
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(module.device) if cuda else None,
            "rss_peak_bytes": resident_bytes("VmHWM"),
        }

    def on_train_end(self, trainer, module) -> None:
        if self.output_file is None or trainer.global_rank != 0:
            return
        median = statistics.median(self.step_times) if self.step_times else None
        summary = {"warmup_steps": self.warmup, "median_step_s": median, "step_times_s": self.step_times, **self.peak}
        Path(self.output_file).write_text(json.dumps(summary, indent=2))


class MultiplyAddCounter(L.Callback):
    """The matrix multiply-adds (matmuls, attention, convolutions: torch's flop counter, /2)
    of training step `step`: what the step's cost is bounded by when those dominate."""

    def __init__(self, step: int):
        self.step = step
        self.multiply_adds: int | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.counter.__exit__(None, None, None)
            self.multiply_adds = self.counter.get_total_flops() // 2


def mechanism_for(mode: str, cfg: DictConfig, batch_size: int) -> Mechanism:
    """The step's mechanism for `mode`: a DP step of expected batch `batch_size` (the whole
    synthetic dataset, sample rate 1) with the configured clipping bound and noise
    multiplicity, or the non-private step (one draw)."""
    if mode == VANILLA:
        return NonPrivate(batch_size)
    sigma = 1.0 if cfg.profile.noise_multiplier is None else float(cfg.profile.noise_multiplier)
    config = PrivacyConfig(
        clipping=mode,
        max_grad_norm=cfg.privacy.max_grad_norm,
        noise_multiplier=sigma,
        target_epsilon=None,
        noise_multiplicity=cfg.privacy.noise_multiplicity,
        secure_mode=cfg.privacy.secure_mode,
    )
    return DPSGD(config, sample_rate=1.0, dataset_size=batch_size, noise_multiplier=sigma)


def build(cfg: DictConfig, mode: str, batch_size: int) -> tuple[DiffusionModule, tuple[torch.Tensor, torch.Tensor]]:
    """The training module of `mode`, as training builds it, and one synthetic batch of the
    model's input shape."""
    model = instantiate(cfg.model)
    if mode != VANILLA:
        check_model_is_private(model, mode)
    mechanism = mechanism_for(mode, cfg, batch_size)
    module = make_module(cfg, model, mechanism, batch_size, seed=cfg.profile.seed)
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    clipping = None if mode == VANILLA else mode
    check_memory_fits(
        model,
        clipping,
        batch_size,
        mechanism.noise_multiplicity,
        torch.device("cuda" if on_gpu else "cpu"),
        cfg.optimizer._target_,
    )
    generator = torch.Generator().manual_seed(cfg.profile.seed)
    shape = (batch_size, model.in_channels, model.input_size, model.input_size)
    images = torch.rand(shape, generator=generator) * 2 - 1
    labels = torch.randint(model.num_classes, (batch_size,), generator=generator)
    return module, (images, labels)


class RepeatedBatch:
    """A loader that yields the same batch `steps` times."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return iter([self.batch] * self.steps)

    def __len__(self) -> int:
        return self.steps


def run_steps(cfg: DictConfig, module: DiffusionModule, batch, steps: int, callbacks: list) -> L.Trainer:
    """`steps` training steps on the same batch, on one device, writing nothing."""
    trainer = make_trainer(
        cfg.trainer,
        callbacks,
        [],
        devices=1,
        num_nodes=1,
        strategy="auto",
        max_steps=steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=RepeatedBatch(batch, steps))
    return trainer


def cap_gpu_memory(limit_gib: float | None) -> None:
    if limit_gib is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * GIB / total))


def is_out_of_memory(error: BaseException) -> bool:
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "can't allocate memory" in str(error)
        or "out of memory" in str(error)
    )


def measure(config: dict[str, Any], mode: str, batch_size: int, warmup: int, num_iter: int) -> dict[str, Any]:
    """Run in a fresh process: `warmup` + `num_iter` steps of `mode` at `batch_size`."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    cfg = OmegaConf.create(config)
    cap_gpu_memory(cfg.profile.memory_limit_gib)
    record: dict[str, Any] = {"mode": mode, "batch_size": batch_size}
    rss_before_model = resident_bytes()
    try:
        module, batch = build(cfg, mode, batch_size)
    except DoesNotFit as error:  # refused before work; the other modes still run
        return {**record, "status": "refused", "error": str(error)}
    except (ValueError, FileNotFoundError, InstantiationException) as error:
        return {**record, "status": "config_error", "error": str(error)}
    timer = StepTimer(warmup, timed=num_iter)
    # with profile.count_multiply_adds, one more step after the timed ones, under the counter
    counter = MultiplyAddCounter(warmup + num_iter) if cfg.profile.count_multiply_adds else None
    try:
        trainer = run_steps(
            cfg, module, batch, warmup + num_iter + (counter is not None), [timer] + ([counter] if counter else [])
        )
    except Exception as error:  # a mode that fails (e.g. a layer ghost clipping cannot take) must not stop the others
        first_line = (str(error).splitlines() or [""])[0]
        status = "out_of_memory" if is_out_of_memory(error) else "error"
        return {**record, "status": status, "error": f"{type(error).__name__}: {first_line}"}
    peak = timer.peak
    on_gpu = peak["cuda_max_allocated_bytes"] is not None
    training_peak = peak["cuda_max_allocated_bytes"] if on_gpu else peak["rss_peak_bytes"] - rss_before_model
    median = statistics.median(timer.step_times)
    return {
        **record,
        "status": "ok",
        "median_step_s": median,
        "images_per_s": batch_size / median,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "trained_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "multiply_adds": counter.multiply_adds if counter else None,
        "step_times_s": timer.step_times,
        "warmup_steps": warmup,
        "memory": {
            # what the ratios compare: the allocator's peak on GPU; on CPU, the resident memory
            # the training added to the process at its peak (the libraries' share left out)
            "peak_bytes": training_peak,
            "peak_kind": "cuda_max_allocated" if on_gpu else "rss_peak_minus_rss_before_model",
            **peak,
            "rss_before_model_bytes": rss_before_model,
        },
        "device": describe_device(trainer.strategy.root_device),
        "versions": library_versions(),
        "config": OmegaConf.to_container(cfg),
    }


def describe_device(device: torch.device) -> dict[str, Any]:
    described = {
        "type": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described.update(name=properties.name, total_memory_bytes=properties.total_memory)
    return described


def library_versions() -> dict[str, str | None]:
    versions = {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    for library in LIBRARIES:
        try:
            versions[library] = version(library)
        except PackageNotFoundError:
            versions[library] = None
    return versions


#################################################################################
#                      The parent: one fresh process per try                    #
#################################################################################


def in_fresh_process(config: dict[str, Any], mode: str, batch_size: int, warmup: int, num_iter: int) -> dict[str, Any]:
    """`measure` in a new process; a process killed by the system counts as out of memory."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            record = pool.submit(measure, config, mode, batch_size, warmup, num_iter).result()
        except BrokenProcessPool:
            record = {
                "mode": mode,
                "batch_size": batch_size,
                "status": "out_of_memory",
                "error": "the process was killed",
            }
    if record["status"] == "config_error":
        raise ConfigError(record["error"])
    return record


def largest_fitting(fits: Callable[[int], bool], upper: int, first: int = 1) -> int:
    """The largest batch in [1, upper] for which `fits` holds (0 if none), assuming that a
    batch fits whenever a larger one does: doubling from `first`, then bisection."""
    first = min(first, upper)
    if not fits(first):
        return last_fitting(fits, 0, first)
    low = first
    while low < upper:
        candidate = min(2 * low, upper)
        if not fits(candidate):
            high = candidate
            break
        low = candidate
    else:
        return low
    return last_fitting(fits, low, high)


def find_max_batch(config: dict[str, Any], mode: str) -> dict[str, Any]:
    """Largest physical batch of `mode` that fits, from two-step tries in fresh processes,
    among the multiples of `profile.batch_multiple` (fewer tries where a GPU holds hundreds)."""
    limit = config["profile"]["memory_limit_gib"]
    multiple = config["profile"]["batch_multiple"]
    tries = []

    def fits(batch_size: int) -> bool:
        record = in_fresh_process(config, mode, batch_size, warmup=1, num_iter=1)
        peak = record.get("memory", {}).get("peak_bytes")
        fit = record["status"] == "ok" and (limit is None or peak <= limit * GIB)
        tries.append({"batch_size": batch_size, "fits": fit, "status": record["status"], "peak_bytes": peak})
        return fit

    largest = multiple * largest_fitting(
        lambda k: fits(k * multiple),
        config["profile"]["max_batch"] // multiple,
        max(1, config["profile"]["first_batch"] // multiple),
    )
    return {"batch_size": largest, "memory_limit_gib": limit, "tries": tries}


def check_profile_settings(cfg: DictConfig) -> None:
    with settings_checked():
        check_dp_node(cfg.privacy, "python -m dpdit.profile")
    profile = cfg.profile
    unknown = [mode for mode in profile.modes if mode not in MODES]
    if unknown or not profile.modes:
        raise ConfigError(f"profile.modes={list(profile.modes)}: choose among {', '.join(MODES)}")
    if not profile.batch_sizes or any(b < 1 for b in profile.batch_sizes):
        raise ConfigError(f"profile.batch_sizes={list(profile.batch_sizes)}: each must be at least 1")
    if profile.warmup < 0 or profile.num_iter < 1:
        raise ConfigError(
            f"profile.warmup={profile.warmup}, profile.num_iter={profile.num_iter}: "
            "warm-up >= 0 and at least one timed step"
        )
    if profile.find_max_batch and not 1 <= profile.batch_multiple <= profile.max_batch:
        raise ConfigError(
            f"profile.batch_multiple={profile.batch_multiple}, profile.max_batch={profile.max_batch}: "
            "the search tries multiples of batch_multiple up to max_batch, so 1 <= batch_multiple <= max_batch"
        )
    if profile.find_max_batch and profile.first_batch < 1:
        raise ConfigError(f"profile.first_batch={profile.first_batch} must be at least 1")
    if profile.memory_limit_gib is not None and profile.memory_limit_gib <= 0:
        raise ConfigError(f"profile.memory_limit_gib={profile.memory_limit_gib} must be positive (or null)")
    if profile.find_max_batch and profile.memory_limit_gib is None and not torch.cuda.is_available():
        raise ConfigError(
            "profile.find_max_batch=true on a machine without a GPU: the CPU has no memory to run "
            "out of but the system's; set profile.memory_limit_gib to the memory a batch may use"
        )
    for mode in profile.modes:
        if mode != VANILLA:
            try:
                check_precision(cfg.trainer.precision, mode)
            except ValueError as error:
                raise ConfigError(f"profile.modes has {mode}: {error}") from error


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each record's step time and peak memory over vanilla's at the same batch size."""
    vanilla = {r["batch_size"]: r for r in records if r["mode"] == VANILLA and r["status"] == "ok"}
    for record in records:
        base = vanilla.get(record["batch_size"])
        if record["status"] != "ok" or base is None:
            record["vs_vanilla"] = None
            continue
        record["vs_vanilla"] = {
            "step_time": record["median_step_s"] / base["median_step_s"],
            "peak_memory": record["memory"]["peak_bytes"] / max(base["memory"]["peak_bytes"], 1),
            "multiply_adds": record["multiply_adds"] / base["multiply_adds"]
            if record.get("multiply_adds") and base.get("multiply_adds")
            else None,
        }


def format_table(records: list[dict[str, Any]], max_batch: dict[str, Any]) -> str:
    counted = any(r.get("multiply_adds") for r in records)
    header = (
        f"{'mode':<10} {'batch':>6} {'step (s)':>10} {'images/s':>10} {'peak memory':>12} "
        f"{'time/vanilla':>13} {'memory/vanilla':>15}"
    )
    header += f" {'mult-adds/vanilla':>18}" if counted else ""
    lines = [header, "-" * len(header)]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['mode']:<10} {r['batch_size']:>6} {r['status']}: {r['error']}")
            continue
        ratio = r["vs_vanilla"] or {}
        time_ratio = f"{ratio['step_time']:.2f}x" if ratio else "-"
        memory_ratio = f"{ratio['peak_memory']:.2f}x" if ratio else "-"
        line = (
            f"{r['mode']:<10} {r['batch_size']:>6} {r['median_step_s']:>10.4f} {r['images_per_s']:>10.1f} "
            f"{r['memory']['peak_bytes'] / GIB:>8.3f} GiB {time_ratio:>13} {memory_ratio:>15}"
        )
        if counted:
            line += f" {ratio['multiply_adds']:>17.3f}x" if ratio and ratio.get("multiply_adds") else f" {'-':>18}"
        lines.append(line)
    for mode, found in max_batch.items():
        lines.append(f"largest physical batch that fits, {mode}: {found['batch_size']}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Bars of step time and peak memory per batch size, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in measured))
    batches = sorted({r["batch_size"] for r in measured})
    width = 0.8 / max(len(modes), 1)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    quantities = (("median_step_s", 1.0, "median step time (s)"), ("peak_bytes", GIB, "peak memory (GiB)"))
    for axis, (key, unit, label) in zip(axes, quantities):
        for i, mode in enumerate(modes):
            for j, batch in enumerate(batches):
                found = [r for r in measured if r["mode"] == mode and r["batch_size"] == batch]
                if not found:
                    continue
                record = found[0]
                value = (record["memory"] if key == "peak_bytes" else record)[key] / unit
                bars = axis.bar(j + i * width, value, width, color=f"C{i}", label=mode if j == 0 else None)
                if record["vs_vanilla"]:
                    ratio = record["vs_vanilla"]["peak_memory" if key == "peak_bytes" else "step_time"]
                    axis.bar_label(bars, labels=[f"{ratio:.2f}x"], fontsize=8)
        axis.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches])
        axis.set_xlabel("physical batch size (labels: ratio to vanilla)")
        axis.set_ylabel(label)
    axes[0].legend()
    device = measured[0]["device"] if measured else {}
    figure.suptitle(f"DP training step by clipping mode ({device.get('name', device.get('type', ''))})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_profile(cfg: DictConfig) -> dict[str, Any]:
    """Measure every (mode, batch size), optionally each mode's largest batch; write
    `profile.json` and `profile.png`; return the results."""
    check_profile_settings(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    profile = cfg.profile
    records = [
        in_fresh_process(config, mode, batch_size, profile.warmup, profile.num_iter)
        for batch_size in profile.batch_sizes
        for mode in profile.modes
    ]
    add_ratios(records)
    max_batch = {mode: find_max_batch(config, mode) for mode in profile.modes} if profile.find_max_batch else {}
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results = {"records": records, "max_batch": max_batch, "table": format_table(records, max_batch)}
    (output / "profile.json").write_text(json.dumps(results, indent=2))
    plot(records, output / "profile.png")
    return results


@command("profile")
def main(cfg: DictConfig) -> None:
    results = run_profile(cfg)
    print(results["table"])
    print(f"written: {Path(cfg.paths.output_dir) / 'profile.json'}, {Path(cfg.paths.output_dir) / 'profile.png'}")


if __name__ == "__main__":
    main()
