"""Megatron GPT with the GEM loss: a thin layer over megatron-core's ``GPTModel``.

``GemGPTModel`` overrides one method, ``compute_language_model_loss(labels [b, s], logits
[s, b, V/tp]) -> [b, s]``. ``GPTModel`` looks it up at call time for the main head AND for every
Multi-Token-Prediction depth, so GEM covers them all. The loss runs on the last pipeline stage on
this rank's vocabulary shard (``vocab_parallel_gem_loss`` reduces over the tensor-parallel group);
with sequence parallelism the output layer has already gathered the sequence, with context
parallelism the logits and labels are this rank's slice (the loss is per token, so that is exact).

With ``loss="gem"`` the main head's call also returns the per-token cross-entropy and entropy of
``p = softmax(z)`` (no extra collective), stashed on the model for the entry's ``loss_func`` to
report (``pop_token_stats``); the MTP depths compute only their loss. The op runs with
``sync_checks=False``: no host synchronisation in the step; an out-of-vocabulary label raises from
``megatron_gem.ops.raise_deferred_errors()``, which the training entry calls where Megatron syncs
anyway.

With ``linear_fusion=True`` (``--gem-linear-fusion``) the main head's output layer and GEM run as
one op, ``vocab_parallel_linear_gem_loss``: the ``[s, b, V/tp]`` logits are never materialised
(the backward recomputes them chunk by chunk). It is wired through GPTModel 0.19.2's
``output_processor`` hook, which ``_postprocess`` calls after the MTP depths, on the last
pipeline stage only, instead of the output layer + loss; the MTP depths stay unfused. Without
labels (generation, logits wanted) and in inference mode the normal output layer runs. The
fused op runs sync-free too (``sync_checks=False``), with the model's ``impl`` (Triton tiles on
CUDA) and the output layer's gradient-accumulation fusion (``dweight`` into ``main_grad``).

Models are built through Megatron's own builder (``GemGPTModelConfig`` / ``GemGPTModelBuilder``,
the ``PretrainConfigContainer`` path of megatron.training 0.19), which picks the Transformer Engine
layer spec when ``--transformer-impl transformer_engine`` and the local spec otherwise.
``model_provider`` is the classic ``get_model``-style provider over the same builder.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import ClassVar

from megatron.core.inference.utils import InferenceMode
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from megatron_gem.ops import GemConfig, vocab_parallel_gem_loss, vocab_parallel_linear_gem_loss

LOSS_CHOICES = ("ce", "gem")
_LOG = logging.getLogger(__name__)
_POSTPROCESS_SIGNATURE = inspect.signature(GPTModel._postprocess)

__all__ = [
    "GemGPTModel",
    "GemGPTModelConfig",
    "GemGPTModelBuilder",
    "gem_model_config_from_args",
    "model_provider",
    "unwrap_gem_model",
]


class GemGPTModel(GPTModel):
    """``GPTModel`` whose token loss is GEM (``loss="gem"``, settings ``gem``) or Megatron's
    cross-entropy (``loss="ce"``)."""

    # Class defaults so that a GPTModel converted with ``as_gem_model`` (no __init__) is valid.
    gem_loss_type: str = "ce"
    gem: GemConfig = GemConfig()
    gem_linear_fusion: bool = False
    # Loss calls since this forward's _postprocess began: GPTModel 0.19.2 calls
    # compute_language_model_loss once per MTP depth (process_mtp_loss) and then for the main head.
    _gem_loss_calls: int = 0
    _gem_fusion_logged: bool = False

    def __init__(
        self,
        *args,
        loss: str = "ce",
        gem: GemConfig | None = None,
        linear_fusion: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.set_loss(loss, gem, linear_fusion)

    def set_loss(
        self, loss: str, gem: GemConfig | None = None, linear_fusion: bool = False
    ) -> None:
        if loss not in LOSS_CHOICES:
            raise ValueError(f"loss must be one of {LOSS_CHOICES}, got loss={loss!r}")
        if gem is not None and not isinstance(gem, GemConfig):
            raise ValueError(f"gem must be a GemConfig, got gem={gem!r}")
        if not isinstance(linear_fusion, bool):
            raise ValueError(f"linear_fusion must be a bool, got linear_fusion={linear_fusion!r}")
        if linear_fusion:
            _check_linear_fusion(self, loss)
        self.gem_loss_type, self.gem = loss, gem or GemConfig()
        self.gem_linear_fusion = linear_fusion
        self._gem_token_stats = None

    def _postprocess(self, *args, **kwargs):
        self._gem_loss_calls = 0
        if args:  # GPTModel.forward and the combined-1F1B schedule pass keywords; others may not
            kwargs = dict(_POSTPROCESS_SIGNATURE.bind(self, *args, **kwargs).arguments)
            del kwargs["self"]
        if (
            self.gem_linear_fusion
            and kwargs.get("labels") is not None
            and kwargs.get("output_processor") is None
            and not InferenceMode.is_active()
        ):
            # GPTModel 0.19.2 calls output_processor in place of output layer + loss, after
            # the MTP depths and only where post_process: what the fused op replaces, exactly.
            kwargs["output_processor"] = self._fused_main_head
        return super()._postprocess(**kwargs)

    def _fused_main_head(self, *, hidden_states, output_layer, output_weight, labels, **unused):
        """The ``output_processor``: per-token GEM ``[b, s]`` of the main head, from its input
        ``hidden_states`` ``[s(/tp with SP), b, H]`` and this rank's output weight.

        The input goes through what ColumnParallelLinear's forward does before its GEMM: under
        sequence parallelism the all-gather of the sequence (backward: reduce-scatter of
        dhidden), otherwise the copy whose backward all-reduces dhidden over TP; the op's
        dhidden is this rank's partial sum, so either reduction completes it."""
        weight = output_layer.weight if output_weight is None else output_weight
        group = self.tp_group
        if getattr(output_layer, "sequence_parallel", self.config.sequence_parallel):
            hidden = gather_from_sequence_parallel_region(hidden_states, group=group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden_states, group=group)
        loss, ce, entropy = vocab_parallel_linear_gem_loss(
            hidden,
            weight,
            labels.transpose(0, 1).contiguous(),  # [b, s] -> [s, b], the hidden's layout
            beta=self.gem.beta,
            h=self.gem.h,
            tp_group=group,
            return_stats=True,
            sync_checks=False,
            impl=self.gem.impl,
            # as ColumnParallelLinear: dweight straight into the DDP buffer (weight.main_grad)
            gradient_accumulation_fusion=getattr(
                output_layer, "gradient_accumulation_fusion", False
            ),
        )
        self._gem_token_stats = (ce.transpose(0, 1), entropy.transpose(0, 1))
        if not self._gem_fusion_logged:  # once per model: the run's log shows the fusion is on
            self._gem_fusion_logged = True
            _LOG.info(
                "megatron_gem: main head fused with the GEM loss (vocab_parallel_linear_gem_loss, "
                "no [s, b, V/tp] logits), hidden %s, output weight %s",
                tuple(hidden.shape),
                tuple(weight.shape),
            )
        return loss.transpose(0, 1).contiguous()

    def _is_main_head_call(self) -> bool:
        """Whether this loss call is the main head's: the MTP depths come first. (Called outside
        a forward, or without MTP, every call is the main head's.)"""
        mtp_depths = getattr(getattr(self, "config", None), "mtp_num_layers", None) or 0
        calls, self._gem_loss_calls = self._gem_loss_calls, self._gem_loss_calls + 1
        return calls >= mtp_depths

    def compute_language_model_loss(self, labels, logits):
        """Per-token loss ``[b, s]`` (fp32) for labels ``[b, s]`` and logits ``[s, b, V/tp]``."""
        if self.gem_loss_type == "ce":
            return super().compute_language_model_loss(labels, logits)
        target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], Megatron's layout
        main_head = self._is_main_head_call()
        out = vocab_parallel_gem_loss(
            logits,
            target,
            beta=self.gem.beta,
            h=self.gem.h,
            tp_group=self.tp_group,
            return_stats=main_head,
            sync_checks=False,
            impl=self.gem.impl,
            # the output layer's logits are read by nothing after the loss (its backward needs
            # only its input and weight): the gradient can take their memory, as Megatron's CE's
            inplace_backward=logits.grad_fn is not None,
        )
        if not main_head:
            return out.transpose(0, 1).contiguous()
        loss, ce, entropy = out
        self._gem_token_stats = (ce.transpose(0, 1), entropy.transpose(0, 1))
        return loss.transpose(0, 1).contiguous()

    def pop_token_stats(self):
        """``(cross_entropy, entropy)`` per token ``[b, s]`` of the last GEM loss call, or None."""
        stats, self._gem_token_stats = getattr(self, "_gem_token_stats", None), None
        return stats


def _check_linear_fusion(model, loss: str) -> None:
    """One-line ValueErrors for what the fused output layer + GEM cannot do."""
    if loss != "gem":
        raise ValueError(
            f"linear_fusion=True fuses the output layer with GEM: it needs loss='gem', got "
            f"loss={loss!r}"
        )
    config = getattr(model, "config", None)
    if getattr(config, "use_mup", False) and getattr(config, "mup_output_mult", 1.0) != 1.0:
        raise ValueError(
            "linear_fusion=True does not apply MuP's output multiplier "
            f"(mup_output_mult={config.mup_output_mult}); turn one of them off"
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise ValueError(
            "linear_fusion=True computes the output weight's gradient in its own backward: "
            "it cannot be combined with defer_embedding_wgrad_compute=True"
        )
    output_layer = getattr(model, "output_layer", None)  # absent before the last stage
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError("linear_fusion=True: the output layer has a bias, the fused op has none")
    if output_layer is not None and not isinstance(output_layer, ColumnParallelLinear):
        # e.g. TELMHeadColumnParallelLinear for an MXFP8 output projection: its GEMM would
        # not be the op's
        raise ValueError(
            "linear_fusion=True replaces a ColumnParallelLinear output layer, got "
            f"{type(output_layer).__name__}"
        )


def as_gem_model(
    model: GPTModel,
    loss: str = "ce",
    gem: GemConfig | None = None,
    linear_fusion: bool = False,
) -> GemGPTModel:
    """Turn a built ``GPTModel`` into a ``GemGPTModel`` in place.

    Megatron's ``GPTModelBuilder.build_model`` hard-codes ``GPTModel(...)``; rather than copying
    that method (and drifting from it), the built instance gets the subclass, which only adds an
    overridden method and two attributes. This is also the hook for other trainers (e.g.
    Megatron-Bridge's model-provider hooks): build the GPTModel as usual, then call this.
    """
    if not isinstance(model, GPTModel):
        raise ValueError(f"expected a megatron GPTModel, got {type(model).__name__}")
    if not isinstance(model, GemGPTModel):
        model.__class__ = GemGPTModel
    model.set_loss(loss, gem, linear_fusion)
    return model


@dataclasses.dataclass(kw_only=True)
class GemGPTModelConfig(GPTModelConfig):
    """``GPTModelConfig`` plus the loss; built by ``GemGPTModelBuilder``."""

    builder: ClassVar[str] = "megatron_gem.megatron.model.GemGPTModelBuilder"
    loss: str = "ce"
    gem: GemConfig = GemConfig()
    gem_linear_fusion: bool = False


class GemGPTModelBuilder(GPTModelBuilder):
    """Megatron's GPT builder; every stage it builds is a ``GemGPTModel``."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        model = super().build_model(
            pg_collection, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )
        cfg = self._model_config
        return as_gem_model(
            model,
            getattr(cfg, "loss", "ce"),
            getattr(cfg, "gem", None),
            getattr(cfg, "gem_linear_fusion", False),
        )


def gem_model_config_from_args(args, transformer_config=None) -> GemGPTModelConfig:
    """``GemGPTModelConfig`` from Megatron args (as ``gpt_config_from_args``, plus
    ``--loss``...)."""
    from megatron.training.argument_utils import gpt_config_from_args

    cfg = gpt_config_from_args(args, transformer_config, model_config_cls=GemGPTModelConfig)
    # megatron-core 0.19.2's gpt_config_from_args drops --rope-scaling-factor (the model would
    # keep the default 8.0: wrong RoPE for Llama 3.2's factor 32); pass it through.
    cfg.rope_scaling_factor = getattr(args, "rope_scaling_factor", cfg.rope_scaling_factor)
    cfg.loss = getattr(args, "loss", "ce")
    if cfg.loss == "gem":
        cfg.gem = GemConfig(args.gem_beta, args.gem_h, getattr(args, "gem_impl", None) or "auto")
        cfg.gem_linear_fusion = bool(getattr(args, "gem_linear_fusion", False))
    return cfg


def model_provider(
    pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None
):
    """Classic Megatron model provider (``get_model`` signature) building a ``GemGPTModel``.

    Reads Megatron's global args (``megatron.training.get_args()``); the model-parallel state must
    be initialised. ``config`` (a ``TransformerConfig``) overrides the one derived from args.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import get_args

    cfg = gem_model_config_from_args(get_args(), config)
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return GemGPTModelBuilder(cfg).build_model(
        pg_collection, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
    )


def unwrap_gem_model(model):
    """The ``GemGPTModel`` inside DDP / Float16Module wrappers (or None)."""
    while not isinstance(model, GemGPTModel) and hasattr(model, "module"):
        model = model.module
    return model if isinstance(model, GemGPTModel) else None
