from peftkit.methods.selection import BitFit, LayerNormTuning

from . import Case

CASES = [
    Case("bitfit-bert", "bert", lambda: BitFit()),
    Case("bitfit-gpt2", "gpt2", lambda: BitFit()),
    Case("bitfit-cnn", "cnn", lambda: BitFit()),
    Case("bitfit-bert-dense", "bert", lambda: BitFit(target_modules=["output.dense", "LayerNorm"])),
    Case("ln-tuning-llama", "llama", lambda: LayerNormTuning(), hf=True),
    Case("ln-tuning-bert", "bert", lambda: LayerNormTuning(), hf=True),
    Case("ln-tuning-gpt2", "gpt2", lambda: LayerNormTuning(), hf=True),
    Case("ln-tuning-cnn-batchnorm", "cnn", lambda: LayerNormTuning(), hf=True),
]
