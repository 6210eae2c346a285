"""Parameter counts of the released 14B configuration without allocating (backbone and its 157M-parameter
flow-matching head)."""

import jax
import numpy as np
from flax import linen as nn

from conftest import repo_config
from nextstep_jax.checkpoint.mapping import nextstep_table
from nextstep_jax.models.nextstep import abstract_variables


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_14b_parameter_count():
    cfg = repo_config("14b").model
    params = nn.unbox(abstract_variables(cfg))["params"]
    assert _count(params) == 14_953_814_080
    assert _count(params["image_head"]) == 157_228_096
    llm = {k: params[k] for k in ("embed_tokens", "backbone", "lm_head")}
    assert _count(llm) == 14_770_033_664
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    # The mapping table covers exactly these tensors (691 in the official state_dict).
    table = nextstep_table(cfg)
    assert len(table) == 691
    assert sum(int(np.prod(e.torch_shape)) for e in table) == 14_953_814_080


def test_every_parameter_has_logical_axes():
    cfg = repo_config("14b").model
    boxed = abstract_variables(cfg)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    q = boxed["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "head_dim")
