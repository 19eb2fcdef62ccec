"""TrainConfig: the paper's defaults, builders, and clear errors for bad configurations."""

import jax
import jax.numpy as jnp
import pytest

from nc_jax import heads, train
from nc_jax.config import TrainConfig


def test_paper_defaults_validate_and_build():
  cfg = TrainConfig().validate()
  assert (cfg.model, cfg.stem, cfg.affine, cfg.tau, cfg.optimizer, cfg.batch_size,
          cfg.epochs) == ("resnet18", "imagenet", False, 5.0, "agd", 256, 200)
  assert cfg.use_stratified and not TrainConfig(head="standard").use_stratified
  head = cfg.head_config(10, 512)
  assert head.kind == "implicit" and head.tau == 5.0


@pytest.mark.parametrize("head", ["standard", "fixed", "implicit"])
def test_builders_make_a_trainable_state_with_agd(head):
  cfg = TrainConfig(dataset="synthetic", model="mlp", head=head, source="synthetic",
                    batch_size=16).validate()
  model = cfg.backbone()
  tx = cfg.optimizer_transform(steps_per_epoch=10)
  x = jnp.ones((4, 8, 8, 3), jnp.float32)
  d = model.apply(model.init(jax.random.PRNGKey(0), x, train=False), x, train=False).shape[-1]
  state = train.create_train_state(model, tx, cfg.head_config(cfg.info.num_classes, d),
                                   jax.random.PRNGKey(0), x, init_params=cfg.init_params())
  step = train.compile_train_step(None, model=model, tx=tx,
                                  head_config=cfg.head_config(cfg.info.num_classes, d))
  labels = jnp.arange(16) % cfg.info.num_classes
  state, metrics = step(state, jnp.ones((16, 8, 8, 3), jnp.float32), labels)
  assert float(metrics["count"]) == 16 and int(state.step) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="cifar1000"), r"^dataset: expected one of .*cifar10.*got 'cifar1000'"),
    (dict(model="resnet19"), r"^model: expected one of resnet18, .*got 'resnet19'"),
    (dict(head="learned"), r"^head: expected one of standard, fixed, implicit; got 'learned'"),
    (dict(optimizer="lamb"), r"^optimizer: expected one of"),
    (dict(schedule="linear"), r"^schedule: expected one of"),
    (dict(source="web"), r"^source: expected one of"),
    (dict(source="idx"), r"^data_path: source 'idx' needs a data_path"),
    (dict(dataset="cifar100", batch_size=64, stratified=True),
     r"^batch_size: stratified .*K=100, got 64"),
    (dict(dataset="imagenet2012", model="resnet18"), r"^feature_dim: .*d >= .*K.*d=512, K=1000"),
    (dict(batch_size=0), r"^batch_size: expected a positive integer"),
    (dict(epochs=10, warmup_epochs=10, optimizer="sgd", learning_rate=0.1), r"^warmup_epochs"),
    (dict(affine=True), r"^affine: AGD cannot train 1-D parameters"),
    (dict(head="standard", bias=True), r"^bias: AGD cannot train 1-D parameters"),
    (dict(optimizer="agd", learning_rate=0.1), r"learning_rate"),
    (dict(optimizer="sgd", learning_rate=-1.0), r"learning_rate"),
    (dict(compute_dtype="float16"), r"^compute_dtype: expected one of float32, bfloat16"),
    (dict(tau=0.0), r"^tau: expected a positive"),
    (dict(model="vgg13", width=16), r"^width: expected None or a positive integer for a ResNet"),
    (dict(width=0), r"^width: expected None or a positive integer"),
    (dict(dataset="cifar100", width=8), r"^feature_dim: .*d=64, K=100"),   # d = 8·width
])
def test_bad_configurations_fail_clearly(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**kwargs).validate()


def test_imagenet_with_resnet50_is_valid_and_not_stratified():
  cfg = TrainConfig(dataset="imagenet2012", model="resnet50").validate()
  assert not cfg.use_stratified  # K = 1000 > batch 256
  assert TrainConfig(dataset="cifar100", batch_size=64).use_stratified is False
  assert TrainConfig(dataset="cifar100").use_stratified is True


def test_width_and_augment():
  cfg = TrainConfig(width=16).validate()
  assert cfg.backbone().feature_dim == 128 and cfg.head_config(10, 128).feature_dim == 128
  mlp = TrainConfig(model="mlp", width=24).validate().backbone()
  assert mlp.widths == (24, 24) and mlp.feature_dim == 24
  info = cfg.info
  assert cfg.data_spec(True) == info.train_spec and cfg.data_spec(False) == info.eval_spec
  plain = TrainConfig(augment=False)
  assert plain.data_spec(True) == info.eval_spec != info.train_spec


def test_method_variants_set_their_fields_and_the_ufm_keeps_cross_entropy():
  """Each method of the one table sets its head and options; the dot-regression baseline
  trains the fixed ETF at τ = 1 with ½(z_y − 1)², and the UFM (cross-entropy only) refuses it."""
  from experiments import cli, ufm
  from nc_jax.config import METHOD_VARIANTS
  base = TrainConfig(dataset="synthetic", source="synthetic", model="mlp", batch_size=16)
  cfg = cli.config_for(base, "fixed-dotreg", 3).validate()
  assert (cfg.head, cfg.loss, cfg.tau, cfg.seed, cfg.forward_only) == (
      "fixed", "dot_regression", 1.0, 3, False)
  assert cli.config_for(base, "fixed", 3).loss == "cross_entropy"
  assert METHOD_VARIANTS["fixed-dotreg"].loss == "dot_regression"
  assert METHOD_VARIANTS["standard-nonorm"].head_options() == {
      "forward_only": False, "normalise": False, "renormalise_rows": False}
  assert "fixed-dotreg" not in ufm.METHODS and "standard-nonorm" in ufm.METHODS
  with pytest.raises(SystemExit):
    ufm.config_from_args(["--methods", "fixed,fixed-dotreg"])
  # Its train step's loss is ½ mean((z_y − 1)²) of the fixed head's logits at τ = 1.
  model, tx = cfg.backbone(), cfg.optimizer_transform(steps_per_epoch=10)
  images = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 3), jnp.float32)
  labels = jnp.arange(16) % 10
  d = model.apply(model.init(jax.random.PRNGKey(0), images, train=False), images,
                  train=False).shape[-1]
  head = cfg.head_config(10, d)
  assert head.kind == "fixed" and head.tau == 1.0
  state = train.create_train_state(model, tx, head, jax.random.PRNGKey(0), images,
                                   init_params=cfg.init_params())
  h = heads.head_features(head, model.apply({"params": state.params["backbone"]}, images,
                                            train=True))
  assert jnp.allclose(jnp.linalg.norm(h, axis=1), 1.0, rtol=1e-5)   # τ = 1: unit features
  logits, _ = heads.train_logits(head, state.params["head"], state.head, h, labels)
  expected = 0.5 * jnp.mean((logits[jnp.arange(16), labels] - 1.0) ** 2)
  _, metrics = train.train_step(state, images, labels, model=model, tx=tx, head_config=head,
                                loss=cfg.loss)
  assert jnp.allclose(metrics["loss_sum"] / metrics["count"], expected, rtol=1e-5)
  _, ce = train.train_step(state, images, labels, model=model, tx=tx, head_config=head)
  assert not jnp.allclose(ce["loss_sum"], metrics["loss_sum"])
