"""Our converted checkpoint: the Flax params as Orbax items plus what export needs to give the release back."""
