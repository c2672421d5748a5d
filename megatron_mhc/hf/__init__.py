"""Hugging Face transformers model of an mHC GPT (`configuration_mhc`, `attention_mhc`,
`modeling_mhc`), its export from a megatron-mhc checkpoint (`megatron_checkpoint`, `export`) and
its evaluation on Megatron's validation split (`evaluate`); docs/hugging_face.md."""
