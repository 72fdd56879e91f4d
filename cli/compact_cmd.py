"""`vitcompact compact`: physically remove the pruned heads and neurons."""

from __future__ import annotations

from pathlib import Path

import typer

import vitcompact as vc
from vitcompact import output_folder

from .common import JsonOption, console, print_json, token_merge_config, token_merge_options, user_errors
from .options import config_options


@user_errors
@config_options(token_merge_options("the compact model (recorded in its artifact)"))
def compact(
    model: str = typer.Argument(..., help="Pruned (masked) artifact directory, preset or timm name."),
    out: Path = typer.Option(..., "--out", "-o", help="Output artifact directory for the compact model."),
    masks: Path | None = typer.Option(None, "--masks", help="masks.safetensors from `vitcompact prune`; "
                                      "default: read the masks from the model's zero weights."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Dense weights (.safetensors/.pth) "
                                           "for a preset or timm MODEL."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the artifact in a non-empty --out "
                                   "(never the input's own files)."),
    json_out: bool = JsonOption,
    given: dict | None = None,
) -> None:
    """Build the smaller model (same function as the masked one) and save it as an artifact.

    Example: vitcompact compact runs/rsst --masks runs/rsst/masks.safetensors --out runs/compact
    """
    token_merge = token_merge_config(given or {})
    output_folder.claim(out, overwrite, inputs=(model, masks, checkpoint))
    dense = vc.create_model(model, checkpoint)
    prune_masks = vc.PruneMasks.load(masks) if masks else None
    small = vc.compact(dense, prune_masks)
    if token_merge is not None:
        vc.merge_tokens(small, token_merge)
    with output_folder.lock(out):
        output_folder.claim(out, overwrite, inputs=(model, masks, checkpoint))  # again, as its only writer
        vc.save(small, out, provenance={"compacted_from": str(model), "masks": str(masks) if masks else None})
    before, after = vc.count(dense, merged=False), vc.count(small)
    merging = vc.get_record(small).token_merge
    summary = {"out": str(out), "dense": {"params": before.params, "macs": before.macs},
               "compact": {"params": after.params, "macs": after.macs, "heads": after.heads,
                           "neurons": after.neurons},
               "token_merge": merging.to_dict() if merging is not None else None,
               "ideal_speedup": before.macs / after.macs}
    if json_out:
        print_json(summary)
        return
    merges = f"token merging r={merging.r} ({merging.schedule}), " if merging is not None else ""
    console.print(f"compact model written to {out}: {after.heads} heads, {after.neurons} neurons, {merges}"
                  f"params {before.params:,} -> {after.params:,}, MACs {before.macs:,} -> {after.macs:,} "
                  f"(ideal speed-up {summary['ideal_speedup']:.2f}x)")
