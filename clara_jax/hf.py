"""Hugging Face interop entry points (`clara_jax.hf.load_decoder`)."""

from clara_jax.interop.hf import hf_config_dict, load_decoder, save_decoder

__all__ = ["load_decoder", "save_decoder", "hf_config_dict"]
