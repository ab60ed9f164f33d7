"""The two orbax layouts Google's ``gemma`` package writes, from the canonical flat tree
(``{"transformer/layer_0/attn/q_einsum/w": array}``); values are passed through as they are."""


def flat_layout(params):
  """Kaggle FLAT: ``{"transformer/layer_0/attn/q_einsum": {"w": ...}}``."""
  flat = {}
  for key, value in params.items():
    module, leaf = key.rsplit("/", 1)
    flat.setdefault(module, {})[leaf] = value
  return flat


def nested_layout(params):
  """NESTED (``model.init()``): no "transformer" root, MLP weights without the "w" leaf."""
  nested = {}
  for key, value in params.items():
    parts = key.removeprefix("transformer/").split("/")
    if parts[-2:] in (["gating_einsum", "w"], ["linear", "w"]):
      parts = parts[:-1]
    node = nested
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return nested
