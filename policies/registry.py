"""Policy lookup by HF `config.model_type`."""
from policies import bloom, gpt2, gpt_neo, gpt_neox, gptj, llama, opt, phi
from policies.base import Policy

POLICIES: tuple[Policy, ...] = (gpt_neo.POLICY, gpt2.POLICY, llama.POLICY, opt.POLICY, gptj.POLICY, gpt_neox.POLICY,
                                bloom.POLICY, phi.POLICY)
_BY_MODEL_TYPE = {t: p for p in POLICIES for t in p.model_types}


class UnsupportedModelError(ValueError):
    """No kernel-injection policy for this model family."""


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def policy_for(hf_config) -> Policy:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedModelError(
            f"no kernel-injection policy for model_type={model_type!r}; supported: "
            f"{', '.join(supported_model_types())}. Pass replace_with_kernel_inject=False to run the HF "
            f"modules as they are, or injection_policy={{BlockClass: ('out_proj names', ...)}} for AutoTP.")
    return _BY_MODEL_TYPE[model_type]
