"""Model and run I/O: where weights and run state come from and go to, for training and for every CLI.
`workdir` (local paths and URLs, the shared-workdir check), `checkpoint` (orbax saves, resume, preemption),
`hf` (Qwen3.5 Hugging Face safetensors import, backbone / MTP export tensors), `hf_pipo` (PIPO heads' HF names
and the HF export writer) and `loading` (the one loader every CLI uses: orbax runs, HF PIPO or plain Qwen3.5
directories -> config, params, tokenizer, special ids). Nothing is imported here; import the modules
(`from pipo_jax.io import checkpoint`)."""
