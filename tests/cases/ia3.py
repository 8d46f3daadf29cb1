from peftkit.methods.ia3 import IA3

from . import Case

CASES = [
    Case("ia3-llama-default", "llama", lambda: IA3(), hf=True),
    Case("ia3-llama-kv-down", "llama",
         lambda: IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), hf=True),
    Case("ia3-llama-no-ff", "llama", lambda: IA3(target_modules=["q_proj", "up_proj"]), hf=True),
    Case("ia3-llama-explicit-empty-ff", "llama", lambda: IA3(target_modules=["v_proj", "down_proj"], feedforward_modules=[])),
    Case("ia3-bert", "bert", lambda: IA3(), hf=True),
    Case("ia3-gpt2-conv1d", "gpt2", lambda: IA3(), hf=True),
    Case("ia3-cnn-conv2d", "cnn", lambda: IA3(target_modules=["conv1", "conv2", "fc"], feedforward_modules=["conv2"]),
         hf=True),
]
