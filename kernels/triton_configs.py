"""Tuning spaces of the Triton kernels (block sizes, warps, pipeline stages), beside the kernels.

``python -m harness verify --compile`` compiles every point for sm_80 and sm_90 and records the
configurations that cannot compile or exceed the target's shared memory in ``triton_pruned.json``
beside this file; the registry leaves those out of the default space.
"""

DENSE = {"BM": (64, 128), "BN": (64, 128), "BK": (32,), "num_warps": (4, 8), "num_stages": (2, 3)}
CS = {"BM": (32, 64, 128), "BN": (32, 64), "num_warps": (4,), "num_stages": (1, 2)}
CS_DIRECT = {"BM": (16, 32, 64, 128), "BN": (16, 32, 64), "num_warps": (2, 4, 8), "num_stages": (1,),
             "UNROLL": (1, 4), "SPLIT": (1, 4)}
OVW = {"BM": (64, 128), "BK": (16, 32), "num_warps": (4,), "num_stages": (2, 3)}
BSR = {"BM": (64, 128), "BK": (16, 32), "num_warps": (4,), "num_stages": (2,)}
