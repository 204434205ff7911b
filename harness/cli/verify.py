"""``python -m harness verify``: correctness of every kernel, no timing.

Each kernel runs its default configuration (``--all-configs``: its whole space) at every
sparsity on each unique layer shape of the chosen nets at reduced spatial size, checked against
the float64 reference. ``--compile`` adds the ahead-of-time Triton compile of every GPU kernel
configuration (no GPU needed)."""

from __future__ import annotations

import os
import time

import torch

import kernels
import shapes

from .. import UsageError
from ..records import Status
from ..verify import verify_kernels
from .common import name_list, sparsity_list


def add_parser(sub):
    p = sub.add_parser("verify", help="check every kernel against the float64 reference")
    p.add_argument("--nets", default="resnet50,vgg19")
    p.add_argument("--kernels", help="comma list (default: every kernel runnable here)")
    p.add_argument("--sparsities", default="0.5,0.75,0.875,0.9375")
    p.add_argument("--size", type=int, default=12, help="spatial size the layers are reduced to")
    p.add_argument("--all-configs", action="store_true", help="every configuration in the space")
    p.add_argument("--compile", action="store_true",
                   help="also compile every Triton kernel configuration ahead of time")
    p.add_argument("--arch", default="80,90", help="compute capabilities for --compile")
    p.add_argument("--sample", action="store_true",
                   help="with --compile: a representative sample instead of every configuration")
    p.add_argument("--stats", action="store_true",
                   help="with --compile: per kernel and configuration the GPU lease launches "
                        "(paper layers, batch 64), compiled as its launch would: registers, "
                        "shared memory, spills, PTX global loads per FMA or per mma")
    p.set_defaults(func=run)


def run(args) -> int:
    t0 = time.time()
    if args.stats and not args.compile:
        raise UsageError("--stats reports on the ahead-of-time compile: add --compile")
    nets = name_list(args.nets, shapes.NETS, "net")
    sparsities = sparsity_list(args.sparsities)
    if args.size < 3:
        raise UsageError(f"--size must be >= 3, got {args.size}")
    names = name_list(args.kernels, kernels.names(), "kernel") if args.kernels else [
        n for n in kernels.names() if kernels.get(n).available() is None]
    layers = []
    for net in nets:
        for lay in shapes.unique(shapes.load(net)):
            layers.append(lay.scaled(min(lay.h, args.size), min(lay.w, args.size)))
    torch.set_num_threads(os.cpu_count() or 1)
    df = verify_kernels(names, layers, sparsities, args.all_configs)
    bad = df[df.status.map(lambda st: Status(st).failed)]
    summary = df.groupby(["kernel", "status"]).size().unstack(fill_value=0)
    worst = df[df.status == Status.OK].groupby("kernel")["rel_err"].max().rename("worst rel err")
    print(summary.join(worst).to_string())
    rc = 0
    if len(bad):
        print(f"\n{len(bad)} failing checks:")
        print(bad.head(30).to_string(index=False))
        rc = 1
    if args.compile:
        from .. import aot

        rc = max(rc, aot.run_cli(args.arch, nets, sample=args.sample, stats=args.stats))
    print(f"\nverify finished in {time.time() - t0:.0f} s")
    return rc
