from functools import cache

from peftkit.methods.corda import CorDA, corda_calibrate

from . import Case


@cache
def _covariances(model_name: str, targets: tuple[str, ...]) -> dict:
    from ..models import MODELS

    model, inputs, _ = MODELS[model_name](0)
    ids = inputs["input_ids"]
    batches = [ids[i:i + 1] for i in range(ids.shape[0])]
    return {k: v.clone() for k, v in corda_calibrate(model, batches, target_modules=list(targets)).items()}


def _corda(model_name: str, targets: tuple[str, ...], **kwargs):
    return lambda: CorDA(covariances=_covariances(model_name, targets), target_modules=list(targets), **kwargs)


CASES = [
    Case("corda-ipm-llama", "llama", _corda("llama", ("q_proj", "v_proj", "down_proj"), r=4, alpha=8), hf=True, tol=1e-4),
    Case("corda-kpm-llama", "llama", _corda("llama", ("k_proj", "up_proj"), r=2, alpha=4, mode="kpm"), hf=True, tol=1e-4),
    Case("corda-gpt2-conv1d", "gpt2", _corda("gpt2", ("c_attn", "c_fc"), r=4, alpha=8, use_rslora=True), hf=True,
         tol=1e-4),
]
