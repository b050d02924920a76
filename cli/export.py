"""``bilalora export``: merge an adapter, export ONNX (fp32/fp16/INT8), OpenVINO and TensorRT, with parity gates.

Thin over :func:`bilalora.export.run_export` (and :func:`bilalora.export.refit.refit_export`
for ``--refit-onnx`` / ``--refit-engine``): parse the flags, print one line per
artefact (format, seconds, path, MB), the parity figures and the next commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.text import Text

from bilalora.errors import UserError

from .common import console, err_console, user_errors


def _printer():
    from bilalora.export.options import Events

    class _Printer(Events):
        def info(self, message: str) -> None:
            console.print(Text(message, style="dim"), soft_wrap=True)

        def warn(self, message: str) -> None:
            err_console.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)

        def step(self, message: str) -> None:
            console.print(Text(message, style="bold"), soft_wrap=True)

        def merge(self, record: dict) -> None:
            base = record["parameters_base"]
            extra = 100 * (record["parameters_gated"] - base) / max(base, 1)
            if record.get("merged") is False:
                console.print(
                    f"[bold]Unmerged:[/] gated LoRA graph, {record['parameters_gated']:,} parameters "
                    f"(+{extra:.1f} % over the base's {base:,}; --merge removes that)",
                    soft_wrap=True,
                )
                return
            sites = ", ".join(f"{name} {gate:.2f}" for name, gate in record["sites"].items())
            console.print(
                f"[bold]Merge:[/] {len(record['sites'])} site(s) (gates: {sites}), {record['layers']} layers -> "
                f"{record['parameters_merged']:,} parameters, as the base (the gated LoRA graph has "
                f"{record['parameters_gated']:,}, +{extra:.1f} %); max |gated - merged| {record['max_abs']:.1e} "
                f"(gate {record['gate']:.0e})",
                soft_wrap=True,
            )

        def artefact(self, artefact) -> None:
            console.print(
                f"[bold]{artefact.label}:[/] export success [green]OK[/] {artefact.seconds:.1f}s, "
                f"saved as '{escape(str(artefact.destination or artefact.path))}' ({artefact.megabytes:.1f} MB)",
                soft_wrap=True,
            )
            pad = " " * (len(artefact.label) + 2)
            if artefact.parity is not None:
                against = artefact.parity.reference
                console.print(Text(f"{pad}parity vs {against}: {artefact.parity.summary()}"), soft_wrap=True)
            for note in artefact.notes:
                if note and not note.startswith(("onnxslim", "not installed", "skipped")):
                    console.print(Text(pad + note, style="dim"), soft_wrap=True)

    return _Printer()


@user_errors
def export_command(
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", "-a", help="Adapter file. Default: the newest runs/adapt/<name>/adapter.safetensors."
    ),
    base: bool = typer.Option(False, "--base", help="Export the unadapted backbone (the bench's baseline)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b", help="Base network: registry name or package.module:factory (default: the run's)."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Base weights file (default: the run's)."),
    input_norm: Optional[str] = typer.Option(
        None, "--input-norm", help="Input the base weights expect: clip | none | MEAN,STD (default: the run's or "
        "the file's record, else none); folded into the graph, which takes [0, 1] RGB."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder. Default: <run>/export."),
    merge: bool = typer.Option(
        True, "--merge/--no-merge", help="Bake the LoRA deltas into the weights, or keep the gated LoRA graph."
    ),
    trt: bool = typer.Option(
        False, "--trt", help="Also build a TensorRT engine (needs pip install 'bilalora\\[trt]')."
    ),
    fp16: bool = typer.Option(False, "--fp16", help="Also write model_fp16.onnx (fp32 I/O); the engine is fp16."),
    int8: bool = typer.Option(
        False, "--int8", help="Also write a calibrated QDQ model_int8.onnx (PSNR >= 35 dB); the engine is INT8."
    ),
    calib: Optional[Path] = typer.Option(
        None, "--calib", help="Calibration images for --int8 (default: the adapted run's training images)."
    ),
    calib_images: int = typer.Option(16, "--calib-images", min=1, help="How many calibration images (16)."),
    int8_min_psnr: Optional[float] = typer.Option(
        None, "--int8-min-psnr", help="INT8 gate in dB (35); lower it only knowingly (recorded in model.json)."
    ),
    openvino: bool = typer.Option(
        False, "--openvino", help="Also write OpenVINO model.xml/.bin (fp16 weights; run in bf16 where the CPU can)."
    ),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Allow a backbone without weights (random init; for tests only)."
    ),
    shape: Optional[str] = typer.Option(None, "--shape", help="Fixed input HxW (multiples of 4), e.g. 720x1280."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic N, H, W (the default without --shape)."),
    min_hw: Optional[str] = typer.Option(None, "--min", help="Smallest HxW of the engine profile [64x64]."),
    opt_hw: Optional[str] = typer.Option(None, "--opt", help="HxW the engine is tuned for [720x1280]."),
    max_hw: Optional[str] = typer.Option(None, "--max", help="Largest HxW of the engine profile [1080x1920]."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size (fixed with --shape, else the profile's max)."),
    opset: Optional[int] = typer.Option(
        None, "--opset", help="ONNX opset. Default: 17 (TorchScript exporter), 18 with --dynamo."
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of real images for the parity checks."),
    refit: bool = typer.Option(
        False, "--refit", help="Keep every weight named (no folding) so adapters swap in without a rebuild."
    ),
    refit_onnx: Optional[Path] = typer.Option(
        None, "--refit-onnx", help="Swap --adapter's merged weights into this --refit export folder (to --out)."
    ),
    refit_engine: Optional[Path] = typer.Option(
        None, "--refit-engine", help="Refit this TensorRT engine (of a --refit export) with --adapter's weights."
    ),
    dynamo: bool = typer.Option(False, "--dynamo", help="Use the torch.export-based ONNX exporter."),
    workspace: float = typer.Option(4.0, "--workspace", min=0.1, help="TensorRT workspace memory limit, GiB."),
    slim: bool = typer.Option(True, "--slim/--no-slim", help="Simplify the ONNX graph with onnxslim when installed."),
) -> None:
    """Export an adapted model: merged.safetensors, model.onnx, model_fp16.onnx, model_int8.onnx, model.xml,
    model.engine and model.json.

    Without --adapter the newest adapt run is exported into its export/ folder.
    Every artefact is checked against PyTorch (fp32 ONNX max abs error <= 1e-4,
    fp16, OpenVINO and engines PSNR >= 40 dB, INT8 PSNR >= 35 dB; saturated or
    constant outputs always fail); a failure stops the export.
    """
    if refit_onnx is not None or refit_engine is not None:
        _refit(refit_onnx, refit_engine, adapter, out)
        return
    from bilalora.export.pipeline import ExportOptions, run_export

    options = ExportOptions(
        adapter=adapter,
        base=base,
        backbone=backbone,
        weights=weights,
        input_norm=input_norm,
        out=out,
        merge=merge,
        trt=trt,
        fp16=fp16,
        int8=int8,
        calib=calib,
        calib_images=calib_images,
        int8_min_psnr=int8_min_psnr,
        openvino=openvino,
        random_weights=random_weights,
        shape=shape,
        dynamic=dynamic,
        min_hw=min_hw,
        opt_hw=opt_hw,
        max_hw=max_hw,
        batch=batch,
        opset=opset,
        images=images,
        refit=refit,
        dynamo=dynamo,
        workspace_gb=workspace,
        slim=slim,
    )
    from bilalora.export.trt import make_profile

    try:
        profile = make_profile(shape, dynamic, min_hw, opt_hw, max_hw, batch)
        console.print(f"[bold]bilalora export[/]: shapes {profile.describe()}, H and W multiples of 4", soft_wrap=True)
        result = run_export(options, _printer())
    except UserError as exc:
        # Printed here without rich markup: messages name extras such as bilalora[trt].
        err_console.print(Text.assemble(("error:", "bold red"), " ", exc.message), soft_wrap=True)
        raise typer.Exit(2) from None
    cost = result.record.get("cost") or {}
    if cost:
        console.print(
            f"[dim]cost: {cost['parameters']:,} parameters, {cost['gflops']:.2f} GFLOPs at "
            f"{cost['input_hw'][0]}x{cost['input_hw'][1]}[/]",
            soft_wrap=True,
        )
    console.print(f"\nExport complete ({result.seconds:.1f}s)", soft_wrap=True)
    console.print(
        f"Results saved to [bold]{escape(str(result.out_dir))}[/]; record: {escape(str(result.sidecar))}",
        soft_wrap=True,
    )
    for index, command in enumerate(result.next_commands):
        console.print(Text(("Next:     " if index == 0 else "          ") + command), soft_wrap=True)


def _refit(refit_onnx: Optional[Path], refit_engine: Optional[Path], adapter: Optional[Path], out: Optional[Path]):
    """``--refit-onnx DIR`` / ``--refit-engine ENGINE`` with ``--adapter FILE``: swap weights, gate, print."""
    from bilalora.export.refit import refit_export

    if refit_onnx is not None and refit_engine is not None:
        raise UserError("--refit-onnx and --refit-engine exclude each other (--refit-engine refits the ONNX too)")
    if adapter is None:
        raise UserError("--refit-onnx/--refit-engine need --adapter FILE: the adapter to swap in")
    folder = refit_onnx if refit_onnx is not None else Path(refit_engine).parent
    if refit_engine is not None and not Path(refit_engine).is_file():
        raise UserError(f"--refit-engine {refit_engine}: no such engine file")
    try:
        result = refit_export(folder, adapter, out=out, require_engine=refit_engine is not None)
    except UserError as exc:
        err_console.print(Text.assemble(("error:", "bold red"), " ", exc.message), soft_wrap=True)
        raise typer.Exit(2) from None
    for name, count in result.swapped.items():
        console.print(f"[bold]{escape(name)}:[/] {count} weights swapped in [green]OK[/]", soft_wrap=True)
        if name in result.parity:
            console.print(Text(f"  parity vs PyTorch: {result.parity[name]}"), soft_wrap=True)
    for note in result.dropped:
        err_console.print(Text.assemble(("warning:", "yellow"), " ", note), soft_wrap=True)
    console.print(f"\nRefit complete: {escape(str(result.out_dir))}", soft_wrap=True)
