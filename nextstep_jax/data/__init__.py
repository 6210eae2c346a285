"""Data: records on disk, the synthetic "shapes" set, and the Grain pipeline that packs training batches.

The data library never imports the models (nor checkpoints, generation or training): it runs without them.
Its one model-shaped step, patchifying cached latents, uses the array code in ``nextstep_jax.latents``;
caching VAE latents is the top-level tool ``python -m nextstep_jax.encode_latents``.

Modules (one purpose each):
  samples.py         in-memory sample types shared by every stage, skip reasons
  records.py         the on-disk record format (ArrayRecord shards + meta.json) and its writer
  raw_inputs.py      readers of the inputs the builder accepts (image folder, tars, edit/text JSONL)
  build.py           CLI: raw inputs -> verified records
  images.py          safe decoding, RGB conversion, resize + centre crop, normalisation
  buckets.py         aspect-ratio buckets of the official recipe
  tokenizer.py       text tokenizers (tokenizer.json, SentencePiece, built-in bytes) + NextStep special ids
  sequence.py        token/label/image-loss layout of one document
  prepare.py         sample -> document (decode, bucket, caption dropout, tokenise)
  packing.py         documents -> fixed-shape packed batches (segment ids, positions), checkpointable
  pipeline.py        DataConfig (from the config's data section), the Grain pipeline (sharding, shuffling,
                     mixing, workers) and its iterator/metrics
  image_pipeline.py  image batches for tokenizer (VAE) training: the same sources, no text, no packing
  shapes.py          the synthetic "shapes" dataset; scorer.py its mini-GenEval
  sources.py         Grain random-access sources (records, shapes)
"""
