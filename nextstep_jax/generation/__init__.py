"""Image generation from a loaded model (``python -m nextstep_jax.sample`` is its command line).

    generator.py      Generator: captions + edit images + one SamplingSettings -> images, one compiled program
    settings.py       SamplingSettings (the ``sampling`` config section, validated); a model's sampling.json
    prompts.py        prompt rows exactly as the official pipeline builds them
    text_decoding.py  the optional text phase (e.g. a thinking span) before the image
    jobs.py           what to generate: a prompt or a JSONL prompts file, and each image's metadata record
    image_files.py    edit inputs, atomic PNG (+ text chunks) / JSON sidecar writing, grids
"""
