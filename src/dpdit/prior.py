"""The public prior: a non-private training stage on public data that DP fine-tuning starts from.

Pretraining on public data, then fine-tuning under DP, is what makes DP image models useful
(DPImageBench's leaders, PrivImage, DP-LoRA and PDP-Diffusion, all do it). The `prior`
config node names the public stage: an experiment of its own (e.g. `font_digits_pretrain`:
digits rendered from fonts, no private image), run without privacy with this run's model
and image shape. Its result is cached under `prior.cache_dir`, in a folder named by a hash
of every setting that shapes its weights, so it is trained once and reused by every later
run; an interrupted public stage resumes from its last checkpoint.

The private run then starts from it: dpdit's own DiT from its EMA weights (as
`init_ckpt_path`), a diffusers DiT (`model=pretrained`) from its exported DiTPipeline (as
`model.name_or_path`). The public stage saw no private image, so `privacy.init_data` is
`disjoint`: its training spends nothing of this run's budget, and the privacy report says
which checkpoint the run started from and that its steps were not counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict

from dpdit.checkpoints import last_checkpoint
from dpdit.cli import compose_config
from dpdit.files import write_json_atomically

log = logging.getLogger(__name__)

# Written last: a public stage without it was interrupted and is resumed, never reused.
COMPLETE = "prior.json"
# Settings that do not change the public stage's weights: where it runs and what it writes.
NOT_SHAPING_WEIGHTS = ("paths", "logger", "callbacks", "hydra", "prior", "sample", "ckpt_path", "init_ckpt_path")
TRAINER_NOT_SHAPING_WEIGHTS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "plugins",
    "default_root_dir",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
)
# What the public stage copies from the private run's data: the image shape, the classes and
# how digits sit in their images (font digits framed like the private digits); it copies the
# whole diffusion node too (the loss and the noise schedule the weights learn to invert)
IMAGE_SETTINGS = ("image_size", "channels", "num_classes", "framing")


def has_public_prior(cfg: DictConfig) -> bool:
    """Whether the run starts from a public stage (prior=none sets prior.experiment=null)."""
    return cfg.get("prior") is not None and cfg.prior.get("experiment") is not None


def uses_pretrained_model(cfg: DictConfig) -> bool:
    return bool(cfg.model.get("pretrained", False))


def settings_line(cfg: DictConfig) -> str:
    """The fine-tuning settings the `prior` node names (`prior.settings`), with the values this
    run uses (the prior's, or an experiment's or the command line's where they override it)."""
    settings = cfg.prior.get("settings", [])
    keys = [key for key in settings if OmegaConf.select(cfg, key, default=KeyError) is not KeyError]
    values = ", ".join(f"{key}={OmegaConf.select(cfg, key)}" for key in keys)
    if has_public_prior(cfg):
        named = ", ".join(keys)
        return f"the public prior ({cfg.prior.experiment}) sets {named} unless overridden; this run uses {values}"
    return f"prior=none: from the model's initial weights or init_ckpt_path, with {values}"


def check_prior_settings(cfg: DictConfig) -> None:
    """Fail, before any training, where the public prior cannot serve this run."""
    prior = cfg.prior
    if cfg.data.dataset not in prior.datasets:
        raise ValueError(
            f"prior={prior.experiment} is a public prior for data={'|'.join(prior.datasets)}, not for "
            f"data={cfg.data.dataset}: train from scratch with prior=none, or give a public stage of "
            "your own (prior.experiment=<an experiment on public data>, prior.datasets=[...])"
        )
    # privacy=none has no history to count, hence no init_data
    if cfg.privacy.get("init_data", "disjoint") != "disjoint":
        raise ValueError(
            f"privacy.init_data={cfg.privacy.init_data} with prior={prior.experiment}: the public prior never "
            "saw this run's data, so its training is not counted; leave privacy.init_data=disjoint"
        )
    if uses_pretrained_model(cfg) and prior.model is None:
        raise ValueError(
            "model=pretrained with a public prior: say which dpdit DiT the public stage trains and exports "
            "as the DiTPipeline this run fine-tunes, e.g. prior.model=dit_tiny (or prior=none)"
        )


def override_value(value: Any) -> str:
    """A config value as Hydra's override grammar writes it (interpolations kept)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, str) and not value.startswith("${"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def node_overrides(cfg: DictConfig, node: str) -> list[str]:
    """`node.key=value` for every leaf of `cfg[node]`."""

    def leaves(value: Any, key: str):
        if isinstance(value, dict):
            for name, item in value.items():
                yield from leaves(item, f"{key}.{name}")
        else:
            yield f"{key}={override_value(value)}"

    return list(leaves(OmegaConf.to_container(cfg[node]), node))


def public_stage_overrides(cfg: DictConfig) -> list[str]:
    """The command line of the public stage: `prior.experiment` without privacy, with this
    run's image settings (`IMAGE_SETTINGS`), diffusion (the loss and noise schedule the
    weights learn) and sampling settings (how its own samples are drawn and judged), then
    `prior.overrides`."""
    prior = cfg.prior
    return [
        f"experiment={prior.experiment}",
        "prior=none",
        "privacy=none",
        *[f"data.{key}={cfg.data[key]}" for key in IMAGE_SETTINGS if key in cfg.data],
        *node_overrides(cfg, "diffusion"),
        *node_overrides(cfg, "sample"),
        *([f"model={prior.model}"] if prior.model is not None else []),
        *prior.overrides,
    ]


def public_stage_config(cfg: DictConfig) -> DictConfig:
    """The public stage: `public_stage_overrides` with this run's model (or the model config
    `prior.model`, when this run fine-tunes a diffusers DiT), the whole model trained."""
    prior = cfg.prior
    public = compose_config("train", public_stage_overrides(cfg))
    with open_dict(public):
        if prior.model is None:
            public.model = OmegaConf.create(OmegaConf.to_container(cfg.model))
        # the public stage trains the whole model: no fine-tuning choice applies, none keys it
        for key in ("lora_alpha", "lora_rank", "finetune"):
            public.model.pop(key, None)
        public.seed = prior.seed
    return public


def weights_key(public: DictConfig) -> str:
    """A hash of every setting of the public stage that shapes its weights."""
    settings = OmegaConf.to_container(public)
    # dropped before resolving: they point at the run directory, which is not known yet
    paths = {key: value for key, value in settings["paths"].items() if key != "output_dir"}
    for key in NOT_SHAPING_WEIGHTS:
        settings.pop(key, None)
    for key in TRAINER_NOT_SHAPING_WEIGHTS:
        settings["trainer"].pop(key, None)
    # kept for resolving: the data root (a public dataset's folder) may refer to them
    settings = OmegaConf.to_container(OmegaConf.create({**settings, "paths": paths}), resolve=True)
    settings["dpdit"] = version("dpdit")
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_quality(cfg: DictConfig, public: DictConfig, directory: Path) -> dict[str, Any] | None:
    """How recognisable the public stage's own samples (its `samples.npz`) are, judged on
    public data only: `dpdit.evaluate`'s reference classifier, trained on the public data's
    training split, gives their class-consistency and its feature-space FD against the public
    test split. `recognisable` is false under twice chance: samples of no class, noise.
    None when the public data (`public`, the stage's data config) has no test split to judge them by."""
    from dpdit.evaluate import run_evaluation

    if public.dataset == "imagefolder" and public.get("test_root") is None:
        log.info("public prior: its samples are not judged: public data=imagefolder has no test split (data.test_root)")
        return None
    settings = compose_config(
        "evaluate",
        [
            *public_stage_overrides(cfg),
            f"evaluate.samples={directory}",
            "evaluate.metrics=[class_consistency,classifier_fd]",
            "evaluate.fid_reference=test",
        ],
    )
    with open_dict(settings):
        settings.paths.output_dir = str(directory)
        settings.logger = {}
    results = run_evaluation(settings)
    chance = 1.0 / settings.data.num_classes
    return {
        "class_consistency": results["class_consistency"],
        "classifier_fd": results["classifier_fd"],
        "chance": chance,
        "recognisable": results["class_consistency"] >= 2 * chance,
        "samples": results["samples"],
        "judged_by": "a classifier trained on the public training split; FD against the public test split",
        "reference_classifier": results["reference_classifier"],
    }


def warn_if_not_recognisable(record: dict[str, Any]) -> None:
    quality = record.get("sample_quality")
    if quality is not None and not quality["recognisable"]:
        log.warning(
            "public prior in %s: its own samples are not recognisable as their classes (class-consistency %.3f, "
            "chance %.3f, by a classifier trained on the public data): DP fine-tuning from it spends privacy on a "
            "model that does not generate. Train the public stage longer (prior.overrides=[trainer.max_steps=...]) "
            "or check its settings, and look at its samples.png",
            record["directory"],
            quality["class_consistency"],
            quality["chance"],
        )


def prepare_prior(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """Train the public stage with `train` unless a complete one is cached; returns its record
    (the folder, checkpoint and, when exported, DiTPipeline folder)."""
    check_prior_settings(cfg)
    prior = cfg.prior
    cache_dir = Path(prior.cache_dir).expanduser()
    public = public_stage_config(cfg)
    directory = cache_dir / f"{prior.experiment}-{weights_key(public)}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One process trains the public stage; the others (ranks, parallel runs) wait and reuse it.
    with FileLock(f"{directory}.lock"):
        record_path = directory / COMPLETE
        if record_path.is_file():
            log.info(
                "public prior: reusing %s (trained without privacy on public data=%s)", directory, public.data.dataset
            )
            record = json.loads(record_path.read_text())
            warn_if_not_recognisable(record)
            return record
        last = last_checkpoint(directory)
        with open_dict(public):
            public.paths.output_dir = str(directory)
            public.ckpt_path = str(last) if last.is_file() else None
        log.info(
            "public prior: training the model on public data=%s WITHOUT privacy (no private image goes in, so "
            "it spends no privacy) for %d steps into %s; later runs with the same settings reuse it",
            public.data.dataset,
            public.trainer.max_steps,
            directory,
        )
        train(public)
        record = {
            "experiment": prior.experiment,
            "data": public.data.dataset,
            "steps": int(public.trainer.max_steps),
            "directory": str(directory),
            "checkpoint": str(last),
            "pipeline": str(directory / "pipeline")
            if (directory / "pipeline" / "model_index.json").is_file()
            else None,
            "note": "trained without privacy on public data only: no private image went in, no privacy was spent",
            "sample_quality": sample_quality(cfg, public.data, directory),
        }
        if record["sample_quality"] is not None:
            log.info(
                "public prior: its samples' class-consistency on public data is %.3f",
                record["sample_quality"]["class_consistency"],
            )
        warn_if_not_recognisable(record)
        write_json_atomically(record_path, record)
        return record


def start_from_prior(cfg: DictConfig, record: dict[str, Any]) -> None:
    """Point this run at the public stage's weights: its checkpoint for dpdit's DiT, its
    DiTPipeline folder for a diffusers DiT."""
    if not uses_pretrained_model(cfg):
        cfg.init_ckpt_path = record["checkpoint"]
        return
    if record["pipeline"] is None:
        raise ValueError(
            f"the public prior in {record['directory']} has no DiTPipeline export to fine-tune with model=pretrained: "
            f"give prior.model a dpdit DiT that exports (see python -m dpdit.export)"
        )
    cfg.model.name_or_path = record["pipeline"]
