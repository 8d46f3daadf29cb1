from peftkit.methods.boft import BOFT

from . import Case

CASES = [
    Case("boft-llama-blocksize", "llama", lambda: BOFT(boft_block_size=4, target_modules=["q_proj", "v_proj"]), hf=True),
    Case("boft-llama-butterfly", "llama",
         lambda: BOFT(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj", "o_proj", "down_proj"]),
         hf=True),
    Case("boft-bert-blocknum", "bert",
         lambda: BOFT(boft_block_num=8, boft_n_butterfly_factor=2, target_modules=["query", "value", "dense"]), hf=True),
    Case("boft-gpt2-conv1d", "gpt2", lambda: BOFT(boft_block_size=8, target_modules=["c_attn", "c_fc"])),
    Case("boft-cnn-conv2d", "cnn",
         lambda: BOFT(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["conv2", "fc"]), hf=True),
    Case("boft-cnn-conv2d-odd", "cnn", lambda: BOFT(boft_block_size=9, target_modules=["conv1"]), hf=True),
]
