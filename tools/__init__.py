"""Offline tools beside the serving core: the `diffuserve` command (`cli`), reference conformance, training of the
bundled models, weight pruning and the task evaluation they share. They import the engine; the engine never imports
them."""
