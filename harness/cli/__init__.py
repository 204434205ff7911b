"""Command line: ``python -m harness {list,bench,verify,table,export,report,autotune,e2e,merge,probe,
lease}``."""

from __future__ import annotations

import argparse
import importlib
import sys

import pandas as pd

from kernels.registry import PluginError

from .. import UsageError, interrupts

COMMANDS = ("bench", "verify", "table", "export", "report", "autotune", "e2e", "merge", "probe",
            "lease")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other usage error
        raise UsageError(message)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _print_table(df: pd.DataFrame) -> None:
    with pd.option_context("display.max_rows", None, "display.max_columns", None,
                           "display.width", 200, "display.max_colwidth", 60):
        print(df.to_string(index=False))


# --- list --------------------------------------------------------------------------------------
def cmd_list(args) -> int:
    import shapes
    from kernels import patterns

    if args.what == "shapes":
        nets = _csv_list(args.net) if args.net else list(shapes.NETS)
        totals = []
        for net in nets:
            try:
                layers = shapes.load(net)
            except ValueError as e:
                raise UsageError(str(e)) from None
            uniq = {u.shape_key: u for u in shapes.unique(layers)}
            df = pd.DataFrame([{
                "idx": lay.index, "name": lay.name, "cin": lay.cin, "cout": lay.cout,
                "k": f"{lay.kh}x{lay.kw}", "stride": lay.stride, "pad": lay.padding,
                "in": f"{lay.h}x{lay.w}", "out": f"{lay.oh}x{lay.ow}",
                "MMAC": round(lay.macs() / 1e6, 1),
                "same shape x": uniq[lay.shape_key].count} for lay in layers])
            print(f"\n{net}: {len(layers)} convolutions, {len(uniq)} unique shapes, "
                  f"{shapes.total_macs(layers) / 1e9:.3f} GMAC per 224x224 image")
            _print_table(df)
            totals.append({"net": net, "convs": len(layers), "unique shapes": len(uniq),
                           "GMAC/image": round(shapes.total_macs(layers) / 1e9, 3)})
        if len(totals) > 1:
            print("\nTotals")
            _print_table(pd.DataFrame(totals))
        return 0
    if args.what == "patterns":
        rows = []
        for name in patterns.names():
            param, values = patterns.SWEEP_PARAMS[name]
            rows.append({"pattern": name, "parameter": param or "-",
                         "values": ", ".join(map(str, values)) or "-",
                         "what is kept": patterns.SUMMARY[name]})
        _print_table(pd.DataFrame(rows))
        return 0
    if args.what == "kernels":
        import kernels

        rows = []
        for name in kernels.names():
            k = kernels.get(name)
            why = k.available()
            if why is None and k.device == "cuda" and kernels.interpreting():
                why = "interpreter only (TRITON_INTERPRET=1)"
            rows.append({"kernel": k.name, "pattern": k.pattern, "device": k.device,
                         "space": "; ".join(f"{p}={list(v)}" for p, v in k.space.items()) or "-",
                         "available": why or "yes"})
        _print_table(pd.DataFrame(rows))
        return 0
    raise UsageError(f"unknown list target {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m harness", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    lp = sub.add_parser("list", help="print the layer catalogs, patterns or kernels")
    lp.add_argument("what", choices=["shapes", "patterns", "kernels"])
    lp.add_argument("--net", help="comma-separated nets (default: all)")
    lp.set_defaults(func=cmd_list)
    for mod in COMMANDS:
        importlib.import_module(f"{__name__}.{mod}").add_parser(sub)
    return p


def main(argv=None) -> int:
    try:
        with interrupts.handled():
            args = build_parser().parse_args(argv)
            return int(args.func(args) or 0)
    except (UsageError, PluginError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if interrupts.by_sigterm(e):
            print("terminated (SIGTERM)", file=sys.stderr)
            return interrupts.EXIT_SIGTERM
        print("interrupted", file=sys.stderr)
        return 130
