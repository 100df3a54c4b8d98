"""Configuration of CODIS (Multi-modal Alignment using Representation Codebook, Duan et al., CVPR 2022)."""

from typing import Literal

from .configuration_albef import ALBEFStackConfig, Real, interval, non_negative, positive, strict_config


@strict_config
class CODISConfig(ALBEFStackConfig):
    r"""Configuration of [`CODISModel`]: the ALBEF-style stack of [`ALBEFStackConfig`] (towers, fusion encoder, EMA
    teachers, queues, ITM, MLM; see there for those fields) plus a learnable codebook of cluster centres shared by
    both modalities. The training loss is

        cma_weight * (i2t + t2i) + imc_weight * (i2i + t2t)              (four-term queue contrastive, L_ica)
        + code_weight * (code_image + code_text)                          (student code prediction vs OT plans)
        + ot_weight * (ot_image + ot_text)                                (OT cost: moves the codewords)
        + itm_weight * itm + mlm_weight * mlm

    (the paper's total with all weights 1; the paper's weights are not confirmed, hence fields).

    Args:
        codebook_size: number K of codewords (cluster centres). The paper's value (4,000) is not confirmed.
        codebook_dim: dimension of the codewords; None uses `embed_dim` (the contrastive features are assigned
            directly). A different value adds a bias-free linear map `code_proj` from the contrastive space to the
            codebook space, shared by both modalities.
        code_temperature: temperature of the student's code distribution ``softmax(cos(feature, codeword) / t)``.
        ot_solver: "ipot" (inexact proximal point OT) or "sinkhorn" (entropic OT) for the assignment plans.
        ot_iterations: outer iterations of IPOT / scaling iterations of Sinkhorn (paper: IPOT, 50).
        ipot_beta: IPOT's proximal step size beta (paper: 0.5).
        ipot_inner_iterations: Sinkhorn scalings per IPOT step (1, as in IPOT's paper).
        sinkhorn_epsilon: entropic regularisation of Sinkhorn.
        code_targets: "swapped" (default): the image student predicts the text teacher's plan of its paired text
            and vice versa -- the paper's cross-view teaching, where one view's teacher guides the student of the
            other view (image and text being the two views), and the better of the two on the digits benchmark
            (BENCHMARKS.md); "own": each modality's student predicts its own teacher's plan, the modalities meeting
            only through the shared codebook.
        code_weight, ot_weight: weights of the code-prediction and OT-cost terms (0 disables a term).
    """

    model_type = "codis"
    loss_weight_fields = ALBEFStackConfig.loss_weight_fields + ("code_weight", "ot_weight")

    codebook_size: int = interval(2)(default=4000)
    codebook_dim: int | None = positive(default=None)
    code_temperature: Real = positive(default=0.1)
    ot_solver: Literal["ipot", "sinkhorn"] = "ipot"
    ot_iterations: int = positive(default=50)
    ipot_beta: Real = positive(default=0.5)
    ipot_inner_iterations: int = positive(default=1)
    sinkhorn_epsilon: Real = positive(default=0.05)
    code_targets: Literal["own", "swapped"] = "swapped"
    code_weight: Real = non_negative(default=1.0)
    ot_weight: Real = non_negative(default=1.0)

    @property
    def code_dim(self) -> int:
        """Dimension of the codewords."""
        return self.codebook_dim or self.embed_dim

    def solver_kwargs(self) -> dict:
        """Keyword arguments of the chosen OT solver (`losses.ipot` / `losses.sinkhorn`)."""
        if self.ot_solver == "ipot":
            return {
                "beta": self.ipot_beta,
                "iterations": self.ot_iterations,
                "inner_iterations": self.ipot_inner_iterations,
            }
        return {"epsilon": self.sinkhorn_epsilon, "iterations": self.ot_iterations}


__all__ = ["CODISConfig"]
