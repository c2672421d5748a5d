"""Hugging Face transformers model of an mHC GPT (`modeling_mhc`, `configuration_mhc`) and its
export from a megatron-mhc checkpoint (`export`); docs/hugging_face.md."""
