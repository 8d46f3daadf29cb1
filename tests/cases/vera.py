from peftkit import VeRA

from . import Case

CASES = [
    Case("vera-llama", "llama", lambda: VeRA(r=8, d_initial=0.3, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"]),
         hf=True),
    Case("vera-gpt2-conv1d-no-projection", "gpt2",
         lambda: VeRA(r=16, projection_prng_key=3, save_projection=False, target_modules=["c_attn", "c_fc"]), hf=True),
]
