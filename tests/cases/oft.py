from peftkit.methods.oft import OFT

from . import Case

CASES = [
    Case("oft-llama-blocksize", "llama", lambda: OFT(oft_block_size=8, target_modules=["q_proj", "v_proj"]), hf=True),
    Case("oft-llama-r-embedding", "llama", lambda: OFT(r=4, target_modules=["q_proj", "down_proj", "embed_tokens"]), hf=True),
    Case("oft-llama-cayley-exact", "llama",
         lambda: OFT(oft_block_size=4, use_cayley_neumann=False, target_modules=["k_proj", "o_proj", "up_proj"]), hf=True),
    Case("oft-llama-coft-block-share", "llama",
         lambda: OFT(oft_block_size=8, coft=True, eps=0.5, block_share=True, target_modules=["q_proj", "gate_proj"]), hf=True),
    Case("oft-bert", "bert",
         lambda: OFT(oft_block_size=8, num_cayley_neumann_terms=3, target_modules=["query", "value", "dense"]), hf=True),
    Case("oft-gpt2-conv1d", "gpt2", lambda: OFT(oft_block_size=8, target_modules=["c_attn", "c_fc"])),
    Case("oft-cnn-conv2d", "cnn", lambda: OFT(oft_block_size=9, target_modules=["conv1", "conv2"]), hf=True),
]
