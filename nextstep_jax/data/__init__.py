"""Data: records on disk, the synthetic "shapes" set, and the Grain pipeline that packs training batches.

Modules (one purpose each):
  samples.py         in-memory sample types shared by every stage, skip reasons
  records.py         the on-disk record format (ArrayRecord shards + meta.json) and its writer
  raw_inputs.py      readers of the inputs the builder accepts (image folder, tars, edit/text JSONL)
  build.py           CLI: raw inputs -> verified records
  images.py          safe decoding, RGB conversion, resize + centre crop, normalisation, latent patchify
  buckets.py         aspect-ratio buckets of the official recipe
  tokenizer.py       text tokenizers (tokenizer.json and SentencePiece) + NextStep special ids
  sequence.py        token/label/image-loss layout of one document
  prepare.py         sample -> document (decode, bucket, caption dropout, tokenise)
  packing.py         documents -> fixed-shape packed batches (segment ids, positions), checkpointable
  pipeline.py        the Grain pipeline (sharding, shuffling, mixing, workers) and its iterator/metrics
  shapes.py          the synthetic "shapes" dataset; scorer.py its mini-GenEval
  sources.py         Grain random-access sources (records, shapes)
  encode_latents.py  CLI: records with pixels -> records with VAE latents
  bench.py           throughput benchmark (not a test)
"""
