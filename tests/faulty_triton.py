"""A deliberately wrong Triton kernel (HARNESS_PLUGINS=faulty_triton): the real dense implicit
GEMM launched with weights scaled by 1.01, so the GPU pipeline's correctness gate, run through
Triton's interpreter, must record it ``incorrect``."""

from kernels import register
from kernels.triton_kernels import DenseTritonImplicitGemm


@register
class FaultyTritonWrong(DenseTritonImplicitGemm):
    name = "faulty_triton_wrong"

    def _prepare(self, layer, weight, sparsity, config):
        run = super()._prepare(layer, weight * 1.01, sparsity, config)
        run.masked_weight = weight  # claims to compute with the unscaled weight
        return run
