"""One of two real JAX processes (gloo collectives on localhost): print the document keys this process's
default (process-index based) data sharding yields. Run by test_multiprocess_sharding.py."""

import json
import sys

import jax


def main(process_id: int, port: int, records: str, tokenizer_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_documents
    from nextstep_jax.data.tokenizer import load_tokenizer

    assert jax.process_count() == 2 and jax.process_index() == process_id
    config = DataConfig(seq_len=192, batch_size=2, image_size=32, max_images_per_row=4, num_epochs=1)
    keys = [doc.key for doc in make_documents(config, [DatasetSpec(records)], load_tokenizer(tokenizer_dir))]
    print(json.dumps({"process": jax.process_index(), "keys": keys}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
