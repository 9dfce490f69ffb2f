"""GEM in Megatron-Bridge (``megatron.bridge``, 0.6.x) fine-tuning recipes: one call.

    from megatron.bridge.recipes.llama import llama3_8b_sft_config
    from megatron.bridge.training.finetune import finetune
    from megatron_gem import GemConfig
    from megatron_gem.bridge import use_gem

    cfg = llama3_8b_sft_config()
    forward_step = use_gem(cfg.model, GemConfig(beta=0.7, h="linear"))
    finetune(cfg, forward_step_func=forward_step)

``use_gem`` registers ``gem_pre_wrap_hook`` on Bridge's model provider (``cfg.model``, any
``ModelProviderMixin``: Bridge calls its pre-wrap hooks on the list of built model chunks before
the mixed-precision and DDP wrappers), which turns every built ``GPTModel`` into the project's
``GemGPTModel`` in place (``megatron_gem.megatron.model.as_gem_model``: GEM for the main head
and every MTP depth), and returns ``gem_forward_step``: Bridge's own ``gpt_step.forward_step``
(its batches, packing, CP split and ``PackedSeqParams``) with the loss reduction replaced by
``megatron_gem.megatron.loss.reduce_token_losses`` (``loss_function``), so Bridge logs
``lm loss`` (the cross-entropy, comparable with a CE run), ``gem loss`` and ``entropy``.

Conversion for the model families Bridge has and the project's converter lacks (Qwen3,
Mistral, Gemma): ``conversion_path`` says which converter an HF config takes, and
``import_hf_checkpoint`` / ``export_hf_checkpoint`` call Bridge's ``AutoBridge``.

Nothing here imports ``megatron.bridge`` at module import (it imports Transformer Engine
unconditionally): only ``gem_forward_step`` does, when called. The hook and the loss function
need megatron-core alone and are tested on its ``GPTModel``; Bridge's own loop and AutoBridge
were not run by this project (no Transformer Engine on its machines): see docs/bridge.md.
"""

from __future__ import annotations

import functools

from megatron_gem.ops import GemConfig

__all__ = [
    "gem_pre_wrap_hook",
    "loss_function",
    "gem_forward_step",
    "use_gem",
    "AUTOBRIDGE_FAMILIES",
    "conversion_path",
    "import_hf_checkpoint",
    "export_hf_checkpoint",
]

# HF model_type -> family, for the families docs/bridge.md lists as AutoBridge-only (Bridge 0.6
# registers their *ForCausalLM as GPTModel targets). Not "gemma3" (Gemma3ForConditionalGeneration:
# Bridge builds a multimodal Gemma3VLModel, which the GEM hook refuses). Llama and Qwen2 also
# convert with the project's converter.
AUTOBRIDGE_FAMILIES = {
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text: Gemma3ForCausalLM)",
}


def gem_pre_wrap_hook(gem: GemConfig | None = None, loss: str = "gem"):
    """A Bridge pre-wrap hook: ``hook(model_chunks) -> model_chunks`` making each chunk (a
    megatron-core ``GPTModel``) a ``GemGPTModel`` with ``loss`` (``"gem"`` or ``"ce"``) and the
    settings ``gem`` (default ``GemConfig()``). A chunk that is not a ``GPTModel`` (e.g. a
    Mamba or multimodal model) raises ``ValueError`` naming its type."""
    from megatron_gem.megatron.model import LOSS_CHOICES

    if loss not in LOSS_CHOICES:
        raise ValueError(f"loss must be one of {LOSS_CHOICES}, got loss={loss!r}")
    if gem is not None and not isinstance(gem, GemConfig):
        raise ValueError(f"gem must be a GemConfig, got gem={gem!r}")
    settings = gem or GemConfig()

    def hook(model_chunks):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        return [_to_gem(chunk, loss, settings) for chunk in chunks]

    hook.gem, hook.loss = settings, loss  # for inspection (and the tests)
    return hook


@functools.cache
def _gem_subclass(cls):
    """``GemGPTModel`` over a Bridge subclass of ``GPTModel`` (e.g. a VLM's text model), keeping
    that subclass's methods: MRO ``Gem<cls>, GemGPTModel, cls, ..., GPTModel``."""
    from megatron_gem.megatron.model import GemGPTModel

    return type(f"Gem{cls.__name__}", (GemGPTModel, cls), {"__module__": __name__})


def _to_gem(chunk, loss, settings):
    """``as_gem_model`` for megatron-core's ``GPTModel``; a subclass keeps its own methods
    (``as_gem_model`` alone would replace its class), unless it computes its own token loss."""
    from megatron.core.models.gpt import GPTModel

    from megatron_gem.megatron.model import GemGPTModel, as_gem_model

    cls = type(chunk)
    if not isinstance(chunk, GPTModel) or cls is GPTModel or isinstance(chunk, GemGPTModel):
        return as_gem_model(chunk, loss, settings)  # raises ValueError for a non-GPTModel
    if cls.compute_language_model_loss is not GPTModel.compute_language_model_loss:
        raise ValueError(
            f"{cls.__name__} overrides compute_language_model_loss: GEM would replace its own "
            "token loss; not supported"
        )
    chunk.__class__ = _gem_subclass(cls)
    chunk.set_loss(loss, settings)
    return chunk


def loss_function(
    loss_mask,
    *,
    model,
    loss: str = "gem",
    check_for_nan: bool = True,
    check_for_spiky: bool = False,
):
    """``loss_func(output_tensor) -> (sum(loss * mask), num_tokens, report)`` for one micro-batch,
    as Bridge's ``masked_next_token_loss`` returns it; with ``loss="gem"`` the report holds
    ``lm loss`` (the cross-entropy), ``gem loss`` and ``entropy``. ``model``: the forward
    step's model (any wrapper around the ``GemGPTModel``)."""
    from megatron_gem.megatron.loss import reduce_token_losses

    return functools.partial(
        reduce_token_losses,
        loss_mask,
        model=model,
        loss=loss,
        check_nan=check_for_nan,
        check_spiky=check_for_spiky,
    )


def _loss_mask_of(bridge_loss_function):
    """The loss mask inside Bridge's ``partial(masked_next_token_loss, loss_mask, ...)``."""
    args = getattr(bridge_loss_function, "args", ())
    if not isinstance(bridge_loss_function, functools.partial) or not args:
        raise RuntimeError(
            "megatron.bridge.training.gpt_step.forward_step returned "
            f"{type(bridge_loss_function).__name__}, not partial(masked_next_token_loss, "
            "loss_mask, ...): this megatron-bridge version is not supported (0.6.x is)"
        )
    return args[0]


def gem_forward_step(
    state, data_iterator, model, return_schedule_plan: bool = False, *, loss: str = "gem"
):
    """Bridge's ``forward_step`` (``megatron.bridge.training.gpt_step``) with GEM's loss function.

    Pass it as ``forward_step_func`` to ``megatron.bridge.training.finetune.finetune`` (or
    ``pretrain``); Bridge injects ``state`` (first parameter named ``state``). Bridge's NaN /
    spiky-loss settings (``cfg.rerun_state_machine``) carry over. The model must have been made
    a ``GemGPTModel`` (``use_gem`` / ``gem_pre_wrap_hook``) for ``loss="gem"``.
    """
    from megatron.bridge.training.gpt_step import forward_step

    if return_schedule_plan:
        # MoE expert-parallel overlap (overlap_moe_expert_parallel_comm) computes the loss inside
        # its own schedule plan, where GEM's statistics are not collected: not supported
        raise ValueError(
            "return_schedule_plan=True (overlap_moe_expert_parallel_comm) is not supported with "
            "megatron_gem.bridge.gem_forward_step; turn the MoE communication overlap off"
        )
    output, bridge_loss = forward_step(state, data_iterator, model)
    rerun = state.cfg.rerun_state_machine
    return output, loss_function(
        _loss_mask_of(bridge_loss),
        model=model,
        loss=loss,
        check_for_nan=rerun.check_for_nan_in_loss,
        check_for_spiky=rerun.check_for_spiky_loss,
    )


def use_gem(model_provider, gem: GemConfig | None = None, loss: str = "gem"):
    """Turn GEM on in a Bridge recipe: register ``gem_pre_wrap_hook(gem, loss)`` on
    ``model_provider`` (the recipe's ``cfg.model``) and return the forward step to pass to
    ``finetune`` / ``pretrain``."""
    register = getattr(model_provider, "register_pre_wrap_hook", None)
    if not callable(register):
        raise ValueError(
            f"model_provider must be a Megatron-Bridge model provider (cfg.model, with "
            f"register_pre_wrap_hook), got {type(model_provider).__name__}"
        )
    register(gem_pre_wrap_hook(gem, loss))
    return functools.partial(gem_forward_step, loss=loss)


# ----------------------------------------------------------------------------- conversion
def conversion_path(hf_config: dict) -> str:
    """Which converter an HF model takes: ``"project"`` (``megatron-gem-convert``: Llama, Qwen2;
    CPU, Megatron-LM checkpoints) or ``"autobridge"`` (``import_hf_checkpoint``: the families of
    ``AUTOBRIDGE_FAMILIES``; needs Bridge, i.e. a GPU node with TE). ``hf_config``: the
    model's ``config.json`` as a dict. Other model types raise ``ValueError``."""
    from megatron_gem.convert.arch import SUPPORTED_MODEL_TYPES

    model_type = hf_config.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return "project"
    if model_type in AUTOBRIDGE_FAMILIES:
        return "autobridge"
    raise ValueError(
        f"HF config: model_type={model_type!r} has no documented path: the project's converter "
        f"takes {', '.join(SUPPORTED_MODEL_TYPES)}; Megatron-Bridge's AutoBridge "
        f"{', '.join(sorted(AUTOBRIDGE_FAMILIES))} (docs/bridge.md)"
    )


def _auto_bridge():
    try:
        from megatron.bridge import AutoBridge
    except (ImportError, RuntimeError) as err:  # absent, or without a working TE (RuntimeError)
        raise RuntimeError(
            f"megatron.bridge does not import ({err}): AutoBridge needs megatron-bridge with "
            "Transformer Engine (pip install 'megatron-gem[bridge]' on a GPU node); Llama and "
            "Qwen2 convert without it: megatron-gem-convert"
        ) from err
    return AutoBridge


def import_hf_checkpoint(hf_model, megatron_path, **kwargs) -> None:
    """HF model (hub id or directory) -> a Megatron checkpoint in Bridge's format:
    ``AutoBridge.import_ckpt(hf_model, megatron_path, **kwargs)``."""
    _auto_bridge().import_ckpt(hf_model, megatron_path, **kwargs)


def export_hf_checkpoint(hf_model, megatron_path, hf_out, **kwargs) -> None:
    """A Bridge-trained Megatron checkpoint -> an HF directory, with ``hf_model``'s config and
    tokenizer: ``AutoBridge.from_hf_pretrained(hf_model).export_ckpt(megatron_path, hf_out)``."""
    _auto_bridge().from_hf_pretrained(hf_model).export_ckpt(megatron_path, hf_out, **kwargs)
