"""The whole system end to end on the built-in shapes data, on a CPU: ``python -m nextstep_jax.demo`` (``make demo``).

Stages, each skipped when its output is complete, so a killed run picks up where it stopped (the two training
stages also resume inside, from their Orbax checkpoints):

1. ``tokenizer``: a SentencePiece text tokenizer with NextStep's special tokens, trained on shapes captions;
2. ``vae``: the f8 image tokenizer of ``configs/tokenizer_shapes.py`` (``python -m nextstep_jax.train``);
3. ``decoder``: its decoder fine-tuned alone with more noise (``configs/tokenizer_shapes_decoder.py``), so that
   it tolerates the token errors of a generator; the encoder, hence the latent space, stays as trained;
4. ``latents``: the training images encoded once by that VAE (``encode_latents``' code);
5. ``nextstep``: the NextStep model of ``configs/demo.py`` trained on the cached latents, with caption dropout
   for classifier-free guidance, exported to ``OUT/model`` with its sampling settings;
6. ``floor``: the same model untrained (0 steps), exported the same way;
7. ``samples``: the held-out ``eval`` and ``novel`` prompts through ``python -m nextstep_jax.sample``'s code,
   for both models;
8. ``report``: the mini GenEval of the samples, of the VAE's reconstructions of the same held-out images (the
   ceiling) and of those images themselves; ``report.json``, ``report.md``, a labelled grid, learning curves.

Budgets are step counts, so the same seed gives the same numbers on any machine.
"""
