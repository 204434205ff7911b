"""Correctness of kernels without timing: each kernel's default configuration (or its whole
space) on reduced layer shapes, through the same correctness gate as a sweep."""

from __future__ import annotations

import pandas as pd
import torch

import kernels

from . import gate
from .errors import error_text, status_of
from .records import Status


def verify_kernels(names, layers, sparsities, all_configs=False, batch=2):
    rows = []
    for name in names:
        k = kernels.get(name)
        device = "cuda" if k.device == "cuda" and torch.cuda.is_available() else "cpu"
        for lay in layers:
            for S in sparsities if k.pattern != "dense" else [0.0]:
                cfgs = k.configs(lay, S) if all_configs else [None]
                if not all_configs and k.supports(lay, S):
                    rows.append({"kernel": name, "layer": lay.name, "shape": lay.shape_str,
                                 "S": S, "status": Status.UNSUPPORTED.value, "rel_err": None,
                                 "reason": k.supports(lay, S)})
                    continue
                for cfg in cfgs:
                    w, x = gate.make_inputs(lay, batch, torch.float32, device)
                    try:
                        run = k.prepare(lay, w, S, cfg)
                        found = gate.check_correct(lay, k, run, x, S, k.full_config(lay, S, cfg),
                                                   "float32")
                        err, why = found.rel_err, found.reason
                        status = Status.INCORRECT if why else Status.OK
                    except Exception as e:  # noqa: BLE001
                        err, why, status = None, error_text(e), status_of(e)
                    rows.append({"kernel": name, "layer": lay.name, "shape": lay.shape_str,
                                 "S": S, "config": cfg, "status": Status(status).value,
                                 "rel_err": err, "reason": why})
    return pd.DataFrame(rows)
