"""The README's usage example runs as written and trains through the implicit VJP."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

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
