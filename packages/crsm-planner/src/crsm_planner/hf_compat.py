"""Load HuggingFace ``transformers`` Mamba / Mamba2 weights into the `mamba` backbone.

Our modules use HF's parameter names below the embedding, so the mapping is small::

    HF (MambaForCausalLM / Mamba2ForCausalLM)      statelab
    backbone.embeddings.weight                     embed.weight           (StatelabModel)
    backbone.layers.N.norm.weight                  backbone.layers.N.norm.weight
    backbone.layers.N.mixer.<p>                    backbone.layers.N.mixer.<p>
    backbone.norm_f.weight                         backbone.final_norm.weight
    lm_head.weight                                 head.weight            (tied unless configured)

``transformers`` is not needed to use this module: it works on plain state dicts and on
any config object with HF's attribute names. Mamba-2 checkpoints with ``n_groups > 1``
load, but HF's own slow path normalises the gated RMSNorm over all channels, where
mamba-ssm (and this package) normalise per group; outputs then differ from HF's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from crsm_planner.mamba_params import MambaParams


def params_from_hf_config(config: Any, **overrides: Any) -> tuple[MambaParams, int, int]:
    """``(MambaParams, d_model, vocab_size)`` equivalent to a HF ``MambaConfig``/``Mamba2Config``."""
    kind = getattr(config, "model_type", "")
    if kind not in ("mamba", "mamba2"):
        raise ValueError(f"expected a HF config with model_type 'mamba' or 'mamba2', got {kind!r}")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"only hidden_act='silu' is supported, the config has {config.hidden_act!r}")
    d_model = int(config.hidden_size)
    fields: dict[str, Any] = dict(
        n_layers=config.num_hidden_layers, d_state=config.state_size, d_conv=config.conv_kernel,
        expand=int(config.expand), dt_min=config.time_step_min, dt_max=config.time_step_max,
        dt_init_floor=config.time_step_floor, conv_bias=config.use_conv_bias, bias=config.use_bias,
        norm_eps=config.layer_norm_epsilon, residual_in_fp32=config.residual_in_fp32,
    )
    if kind == "mamba":
        fields.update(mixer="mamba1", dt_rank=int(config.time_step_rank))
        if int(config.intermediate_size) != int(config.expand) * d_model:
            raise ValueError("intermediate_size must equal expand * hidden_size")
    else:
        fields.update(mixer="mamba2", headdim=config.head_dim, ngroups=config.n_groups, chunk_size=config.chunk_size)
        if int(config.num_heads) * int(config.head_dim) != int(config.expand) * d_model:
            raise ValueError("num_heads * head_dim must equal expand * hidden_size")
        limit = tuple(getattr(config, "time_step_limit", (0.0, float("inf"))))
        if limit != (0.0, float("inf")):
            raise ValueError(f"time_step_limit {limit} is not supported (only the default (0, inf))")
    fields.update(overrides)
    return MambaParams(**fields), d_model, int(config.vocab_size)


def _strip(key: str) -> str:
    for prefix in ("backbone.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def backbone_state_dict_from_hf(hf_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone part of a HF state dict, under our names (embedding and head left out)."""
    out: dict[str, Tensor] = {}
    for key, value in hf_state_dict.items():
        k = _strip(key)
        if k.startswith("layers."):
            out[k] = value
        elif k == "norm_f.weight":
            out["final_norm.weight"] = value
    return out


def load_hf_state_dict(backbone: torch.nn.Module, hf_state_dict: Mapping[str, Tensor]) -> None:
    """Copy HF Mamba/Mamba2 backbone weights into ``backbone`` (strict: every tensor must match)."""
    sd = backbone_state_dict_from_hf(hf_state_dict)
    ours = backbone.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise KeyError(
            f"HF weights do not fit this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the backbone with "
            "params_from_hf_config(hf_config) so that n_layers and the mixer match")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ValueError(f"{k}: HF tensor has shape {tuple(v.shape)}, ours {tuple(ours[k].shape)}; "
                             "build the backbone with params_from_hf_config(hf_config)")
    backbone.load_state_dict(sd, strict=True)


def load_hf_into_model(model: Any, hf_state_dict: Mapping[str, Tensor]) -> None:
    """Load a full HF ``Mamba(2)ForCausalLM`` state dict (embedding, backbone, head) into a
    :class:`statelab.StatelabModel` whose backbone is `mamba`."""
    emb = None
    for key in ("backbone.embeddings.weight", "backbone.embedding.weight", "embeddings.weight", "embedding.weight"):
        if key in hf_state_dict:
            emb = hf_state_dict[key]
            break
    if emb is None:
        raise KeyError("no embedding (backbone.embeddings.weight) in the HF state dict")
    if tuple(emb.shape) != tuple(model.embed.weight.shape):
        raise ValueError(f"embedding shape {tuple(emb.shape)} != model's {tuple(model.embed.weight.shape)}; "
                         "build the model with vocab_size and d_model from params_from_hf_config")
    load_hf_state_dict(model.backbone, hf_state_dict)
    head = hf_state_dict.get("lm_head.weight", emb)
    tied = model.head.weight is model.embed.weight
    if tied and not torch.equal(head, emb):
        raise ValueError("the HF head is not tied to the embedding but the model ties them; build with tie_embeddings=False")
    with torch.no_grad():
        model.embed.weight.copy_(emb)
        if not tied:
            model.head.weight.copy_(head)


def model_from_hf(hf_model: Any, **overrides: Any) -> Any:
    """A :class:`statelab.StatelabModel` with the weights of a HF ``Mamba(2)ForCausalLM``."""
    from statelab import StatelabModel

    from crsm_planner.backbone import MambaBackbone

    params, d_model, vocab = params_from_hf_config(hf_model.config, **overrides)
    tie = bool(getattr(hf_model.config, "tie_word_embeddings", True))
    model = StatelabModel(vocab_size=vocab, d_model=d_model, backbone=MambaBackbone(d_model, params), tie_embeddings=tie)
    load_hf_into_model(model, hf_model.state_dict())
    return model
