"""The printed report, every section from the numbers of the report's dictionary."""

from __future__ import annotations

from typing import Any

from dpdit.inspect.counts import BLOCK_EMBEDDERS
from dpdit.privacy import CLIPPING
from dpdit.units import size


def millions(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def shape(dims: list[int] | None) -> str:
    """A per-image input shape such as 256x1152; a label per image is a scalar."""
    if dims is None:
        return "not called"
    return "x".join(map(str, dims)) or "scalar"


def table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    """Text columns; `align` has one '<' (left) or '>' (right) per column."""
    cells = [header, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) if a == "<" else cell.rjust(w) for cell, w, a in zip(row, widths, align)).rstrip()
        for row in cells
    ]


def render(report: dict[str, Any]) -> str:
    """The printed report: every section from the numbers of `report`."""
    lines = [*render_parameters(report), *render_block(report["block"])]
    verdict = report["opacus_validator"]
    lines += [f"Opacus validator: {'ok' if verdict['ok'] else 'ERRORS: ' + verdict['errors']}", ""]
    lines += render_clipping(report["clipping"])
    lines += render_memory(report["memory"])
    if "pretrained" in report:
        lines += render_pretrained(report["pretrained"])
    if "paper_sizes" in report:
        lines += render_paper_sizes(report["paper_sizes"])
    return "\n".join(lines).rstrip() + "\n"


def render_parameters(report: dict[str, Any]) -> list[str]:
    model, parameters = report["model"], report["parameters"]
    channels, height, width = model["input"]
    total, trainable = parameters["total"], parameters["trainable"]
    lines = [
        f"{model['class']} on {channels}x{height}x{width} inputs, patch {model['patch_size']} "
        f"({model['tokens']} tokens), {report['block']['blocks']} blocks: "
        f"{model['gflops_per_image']:.4g} Gflops per image (forward)",
        f"parameters: {total:,} ({millions(total)}), trainable: {trainable:,} ({trainable / total:.1%})",
        "",
        "Parameters by module type (each module's own parameters)",
    ]
    lines += table(
        ["type", "parameters", "share"],
        [[r["type"], f"{r['parameters']:,}", f"{r['share']:.1%}"] for r in report["by_type"]],
        "<>>",
    )
    lines += ["", "Parameters by component"]
    lines += table(
        ["component", "parameters", "trainable", "share"],
        [
            [r["component"], f"{r['parameters']:,}", f"{r['trainable']:,}", f"{r['share']:.1%}"]
            for r in report["by_component"]
        ],
        "<>>>",
    )
    return [*lines, ""]


def render_block(block: dict[str, Any]) -> list[str]:
    lines = [
        f"One block (of {block['blocks']}): {block['parameters']:,} parameters, {block['all_blocks']:,} in all blocks"
    ]
    lines += table(
        ["layer", "type", "parameters", "role"],
        [[r["name"], r["type"], f"{r['parameters']:,}", r["role"]] for r in block["layers"]],
        "<<><",
    )
    lines += table(
        ["role", "parameters", "share"],
        [[r["role"], f"{r['parameters']:,}", f"{r['share']:.1%}"] for r in block["roles"]],
        "<>>",
    )
    return [*lines, ""]


def render_clipping(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Clipping path of each trainable layer, per privacy.clipping mode"]
    lines += table(
        ["layer", "", "type", "parameters", "input", *CLIPPING],
        [
            [r["name"], f"x{r['layers']}", r["type"], f"{r['parameters']:,}", shape(r["input_shape"])]
            + [r["paths"][mode] for mode in CLIPPING]
            for r in rows
        ],
        "<><><" + "<" * len(CLIPPING),
    )
    problems = [f"WARNING {r['name']}: {problem}" for r in rows for problem in r["problems"]]
    return [*lines, *problems, ""]


def render_memory(memory: dict[str, Any]) -> list[str]:
    state = memory["training_state"]
    draws = f", {memory['noise_multiplicity']} noise draws per image" if memory["noise_multiplicity"] > 1 else ""
    lines = [f"Memory the DP step adds at physical batch {memory['batch_size']}{draws} (beyond non-private training)"]
    lines += table(["mode", "memory"], [[mode, size(n)] for mode, n in memory["bytes"].items()], "<>")
    lines += [line for mode in CLIPPING.values() if (line := mode.describe_memory(memory))]
    lines += [
        f"every DP mode: {size(memory['noise_workspace_bytes'])} to draw the noise in place, a chunk at a time; "
        "no other copy of the gradients (gradients are freed after each step, not zeroed)",
        f"for context, in every mode: weights {size(state['weights'])}, gradients {size(state['gradients'])}, "
        f"Adam state {size(state['adam'])}, EMA copy {size(state['ema'])} (activations not included)",
        "",
    ]
    return lines


def render_pretrained(pretrained: dict[str, Any]) -> list[str]:
    embedders = pretrained["embedders"]
    difference = embedders["max_abs_difference"]
    agreement = "identical" if embedders["identical"] else f"differ (max abs difference {difference:.3g})"
    lines = [
        f"Per-block embedders ({BLOCK_EMBEDDERS}): {embedders['copies']} copies of "
        f"{embedders['parameters_per_copy']:,} parameters, {embedders['parameters']:,} in all "
        f"({embedders['share']:.1%} of the model); the copies {agreement}",
        "",
        "What each model.finetune choice trains",
    ]
    lines += table(
        ["finetune", "trainable", "share", ""],
        [
            [r["finetune"], f"{r['trainable']:,}", f"{r['share']:.1%}", "(configured)" if r["configured"] else ""]
            for r in pretrained["finetune"]
        ],
        "<>><",
    )
    return [*lines, ""]


def render_paper_sizes(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Paper sizes (Peebles & Xie 2023) at 256 px (32x32x4 latents), 1000 classes, learned sigma"]
    lines += table(
        ["model", "config", "parameters", "published", "Gflops", "published"],
        [
            [r["model"], f"model={r['config']}", millions(r["parameters"]), millions(r["published_parameters"])]
            + [f"{r['gflops']:.2f}", f"{r['published_gflops']:.2f}"]
            for r in rows
        ],
        "<<>>>>",
    )
    return [*lines, ""]
