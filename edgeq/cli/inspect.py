"""`edgeq inspect`: what edgeq sees in a model (opsets, ops, parameters, inputs/outputs, dynamic
axes, subgraphs, custom-domain ops) and what the front end recognised (blocks, mask forms)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.flags import echo_json


@click.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(model: Path, as_json: bool) -> None:
    """Show what edgeq sees in MODEL: opsets, ops, parameters, inputs/outputs, subgraphs, and the
    blocks and attention-mask form the front end recognises."""
    from edgeq.frontend.inspect import summarize
    from edgeq.ir import load

    summary = summarize(load(model, check_runtime=False))
    if as_json:
        echo_json(summary)
        return
    click.echo(f"{model}  (IR {summary['ir_version']}, {summary['producer'] or 'unknown producer'})")
    click.echo("opsets:   " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in summary["opsets"].items()))
    click.echo(f"nodes:    {summary['nodes']} ({summary['subgraphs']} subgraphs)")
    for kind, count in summary["ops"].items():
        click.echo(f"  {kind:<28} {count:>6}")
    click.echo(f"parameters: {summary['parameters_total']:,} ({summary['parameter_bytes_total']:,} bytes)")
    for dtype, entry in summary["parameters"].items():
        click.echo(f"  {dtype:<10} {entry['tensors']:>5} tensors {entry['elements']:>14,} elements "
                   f"{entry['bytes']:>14,} bytes")
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for v in summary[kind]:
            click.echo(f"  {v['name']}: {v['dtype']} {v['shape']}")
    if summary["dynamic_axes"]:
        click.echo("dynamic axes: " + "; ".join(
            f"{name} " + ", ".join(f"{axis}={dim}" for axis, dim in axes.items())
            for name, axes in summary["dynamic_axes"].items()))
    if summary["custom_ops"]:
        click.echo("custom-domain ops: " + ", ".join(f"{k} {n}" for k, n in summary["custom_ops"].items()))
    if summary["functions"]:
        click.echo("local functions: " + ", ".join(summary["functions"]))
    front = summary["front_end"]
    how = ("compiled model, read as it is" if front["compiled_model"]
           else "after " + ", ".join(front["passes"]) if front["passes"] else "as loaded")
    click.echo(f"front end ({how}):")
    if front["error"]:
        click.echo(f"  front end stopped: {front['error']}")
    blocks = summary["recognised_blocks"]
    click.echo("  recognised blocks: " + (", ".join(f"{role} {n}" for role, n in blocks.items()) or "none"))
    if summary["mask"]:
        click.echo("  attention mask: " + ", ".join(f"{form} ({n} attention{'s' if n > 1 else ''})"
                                                     for form, n in summary["mask"].items()))
    if summary["custom_ops_after_front_end"]:
        click.echo("  custom-domain ops left: " + ", ".join(
            f"{k} {n}" for k, n in summary["custom_ops_after_front_end"].items()))
