"""One of two real JAX processes (gloo collectives on localhost): print the document keys this process's
default (process-index based) data sharding yields, and what DataConfig.from_config derives for a global batch
of 4 rows. Run by test_multiprocess_sharding.py."""

import json
import sys

import jax


def main(process_id: int, port: int, records: str, tokenizer_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import ml_collections

    from nextstep_jax.configs import data_config, model_config, vae_config
    from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_documents
    from nextstep_jax.data.tokenizer import load_tokenizer

    assert jax.process_count() == 2 and jax.process_index() == process_id
    config = DataConfig(seq_len=192, batch_size=2, image_size=32, max_images_per_row=4, num_epochs=1)
    keys = [doc.key for doc in make_documents(config, [DatasetSpec(records)], load_tokenizer(tokenizer_dir))]
    whole = ml_collections.ConfigDict(dict(model=model_config(), vae=vae_config(),
                                           data=data_config(seq_len=192, batch_size=4, image_size=32)))
    derived = DataConfig.from_config(whole)
    print(json.dumps({"process": jax.process_index(), "keys": keys, "from_config": [
        derived.batch_size, derived.shard_index, derived.shard_count]}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
