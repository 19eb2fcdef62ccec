"""Worker for tests/test_multihost.py: a few data-parallel train steps in one process of many.

Usage: python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns 2 CPU devices and feeds its contiguous slice of every global
batch; process 0 writes the final (replicated) parameters, head state and
metrics to OUT.npz. NUM_PROCESSES=1 is the reference run on the same devices'
worth of data.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, num_processes: int, port: str, out: str) -> None:
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id)
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from nc_jax import heads, loop, train
  from nc_jax.data.augment import AugmentSpec
  from nc_jax.pipeline import DevicePipeline

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Dense(32, use_bias=False, param_dtype=jnp.float64, dtype=jnp.float64)(x)
      x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                       param_dtype=jnp.float64, dtype=jnp.float64)(x)
      return nn.Dense(8, use_bias=False, param_dtype=jnp.float64, dtype=jnp.float64)(nn.relu(x))

  k, global_batch = 4, 32
  rng = np.random.default_rng(0)
  x_all = rng.standard_normal((3 * global_batch, 6))
  y_all = (np.arange(3 * global_batch) % k).astype(np.int32)
  model, tx = Net(), optax.sgd(0.05, momentum=0.9)
  cfg = heads.HeadConfig("implicit", num_classes=k, feature_dim=8)
  mesh = train.make_mesh()
  state = train.create_train_state(model, tx, cfg, jax.random.PRNGKey(0), jnp.zeros((2, 6)))
  state = train.replicate(state, mesh)
  step = train.compile_train_step(mesh, model=model, tx=tx, head_config=cfg)
  local = global_batch // jax.process_count()
  lo = jax.process_index() * local
  total = None
  for i in range(3):
    xb = x_all[i * global_batch:(i + 1) * global_batch][lo:lo + local]
    yb = y_all[i * global_batch:(i + 1) * global_batch][lo:lo + local]
    state, metrics = step(state, *train.global_batch((xb, yb), mesh))
    total = train.add_metrics(total, metrics)
  local_copy = lambda a: np.asarray(a.addressable_data(0))
  leaves = [local_copy(a) for a in jax.tree.leaves((state.params, state.head, state.batch_stats))]
  summed = {key: local_copy(v) for key, v in total.items()}

  # Whole epochs from device-resident data with on-device augmentation (loop.fit): each
  # process feeds its slice of every index batch.
  spec = AugmentSpec(mean=(0.5,), std=(0.25,), channels=1, flip=True, crop_padding=1)
  images = rng.integers(0, 256, (96, 6, 6, 1)).astype(np.uint8)
  labels = (np.arange(96) % k).astype(np.int32)

  class ImageNet(Net):
    def __call__(self, x, train: bool = False):
      return super().__call__(x.reshape(x.shape[0], -1), train)

  image_model = ImageNet()
  fit_state = train.create_train_state(image_model, tx, cfg, jax.random.PRNGKey(1),
                                       jnp.zeros((2, 6, 6, 1)))
  data = DevicePipeline.create((images, labels), (images, labels), train_spec=spec,
                               eval_spec=spec.eval_spec(), batch_size=32, num_classes=k,
                               stratified=True, mesh=mesh)
  steps = data.compile(model=image_model, tx=tx, head_config=cfg)
  fitted = loop.fit(train.replicate(fit_state, mesh), data, steps=steps, epochs=2)
  leaves += [local_copy(a) for a in jax.tree.leaves((fitted.state.params, fitted.state.head))]
  summed["fit_eval_top1"] = np.asarray(fitted.history[-1]["eval"]["top1"])
  if jax.process_index() == 0:
    np.savez(out, *leaves, **{f"metric_{k_}": v for k_, v in summed.items()},
             processes=jax.process_count(), devices=jax.device_count())
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
