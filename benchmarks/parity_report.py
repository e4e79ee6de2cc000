"""Max |logit difference| against transformers (PyTorch) for every supported family.

    python benchmarks/parity_report.py

Same perturbed tiny models as tests/test_hf_parity.py; prints the measured errors (the test
only asserts the 1e-4 bound) for the base model and with a PEFT LoRA adapter active.
"""

from __future__ import annotations

import tempfile

import jax.numpy as jnp
import numpy as np
import peft

from clara_jax.interop.hf import load_decoder
from clara_jax.interop.peft import load_peft_adapter
from tests import hf_reference as ref


def main():
    ids, mask = ref.left_padded_batch(seed=1)
    valid = mask.astype(bool)
    print(f"{'family':<16} {'base max|dlogit|':>18} {'LoRA max|dlogit|':>18}")
    for name in sorted(ref.FAMILIES):
        with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as lora_dir:
            torch_model = ref.save_family(name, base_dir)
            model = load_decoder(base_dir)
            base_err = np.abs(
                np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
                - ref.torch_logits(torch_model, ids, mask)
            )[valid].max()
            lora = peft.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            )
            peft_model = peft.get_peft_model(ref.build_family(name), lora).eval()
            ref.perturb_(peft_model, seed=7, scale=0.1, only="lora_")
            peft_model.save_pretrained(lora_dir)
            load_peft_adapter(model, "generator", lora_dir)
            got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), adapter="generator"))
            lora_err = np.abs(got - ref.torch_logits(peft_model, ids, mask))[valid].max()
        print(f"{name:<16} {base_err:>18.2e} {lora_err:>18.2e}")


if __name__ == "__main__":
    main()
