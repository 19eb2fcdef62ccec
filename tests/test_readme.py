"""The README's usage example runs as written and trains through the implicit VJP."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_differentiates():
  code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
  scope = {}
  exec(compile(code, str(README), "exec"), scope)
  f, state, d, k = scope["implicit_etf_logits"], scope["state"], scope["d"], scope["K"]
  key = jax.random.PRNGKey(0)
  labels = jnp.arange(64) % k
  h = jax.random.normal(key, (64, d))
  h = 5.0 * h / jnp.linalg.norm(h, axis=1, keepdims=True)
  p = None
  for _ in range(2):
    logits, state, p = f(h, labels, state, p)
  assert logits.shape == (64, k)
  loss = lambda x: -jnp.mean(jax.nn.log_softmax(f(x, labels, state, p)[0])[jnp.arange(64), labels])
  g = jax.grad(loss)(h)
  assert np.all(np.isfinite(g)) and float(jnp.linalg.norm(g)) > 0


@pytest.mark.parametrize("changes", [
    'model="mlp"',
    'model="mlp", width=16, augment=False',   # another feature dimension and data spec
])
def test_readme_training_example_runs_on_synthetic_data(changes):
  """The training example, with the offline FashionMNIST files swapped for synthetic data,
  a small MLP backbone and one epoch, so it runs anywhere (8 fake devices here); changing the
  width or the augmentation needs no other edit."""
  code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[3]
  original = ('TrainConfig(dataset="fashion_mnist", source="idx", '
              'data_path="/usr/share/datasets/fashion-mnist",')
  assert original in code
  code = code.replace(original, 'TrainConfig(dataset="synthetic", source="synthetic", '
                      f'data_path=None, {changes},').replace("epochs=20", "epochs=1")
  records = []
  scope = {"print": records.append}
  exec(compile(code, str(README), "exec"), scope)
  assert len(records) == 1 and records[0]["train"]["count"] == 2560 - 2560 % 256
  assert records[0]["eval"]["count"] == 512
  assert scope["result"].history == records and not scope["result"].stopped
  width = 16 if "width=16" in changes else 512
  assert scope["head"].feature_dim == width
  assert scope["pipe"].train_spec == scope["cfg"].info.spec("augment=False" not in changes)


def test_readme_heads_example_trains_and_collapses():
  """The heads-in-your-own-model example runs as written (it prints loss and NC1)."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  printed = []
  scope = {"print": lambda *a: printed.append(a)}
  exec(compile(blocks[0] + blocks[1], str(README), "exec"), scope)
  (loss, nc1), = printed
  # Random inputs, 256 samples: it fits them and collapses towards the CE bound 0.0342.
  assert loss < 0.04 and nc1 < 0.01
  assert scope["head_state"].weight.shape == (10, 64)


def test_readme_nnx_example_trains_and_compiles_twice():
  """The NNX example runs as written: the implicit head trains a CNN through nnx.jit."""
  code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[2]
  assert "from nc_jax.nnx import ImplicitETFHead" in code
  scope = {}
  exec(compile(code, str(README), "exec"), scope)
  losses = scope["losses"]
  assert len(losses) == 20 and all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
  assert scope["model"].head.head_state.get_value().initialised
