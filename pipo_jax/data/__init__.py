"""Host-side data: JSONL schemas (`schemas`), tokenizer + chat template (`tokenizer`), PIPO pair construction
(`pairs`), the TFDS ArrayRecord builder (`tfds_builder`), grain pipelines (`pipeline`) and the synthetic
arithmetic task (`synthetic`). Nothing is imported here so `import pipo_jax.data.pairs` stays light."""
