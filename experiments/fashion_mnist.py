"""``python -m experiments.fashion_mnist``: FashionMNIST (not in the paper; MNIST's recipe, FashionMNIST's normalisation). Offline: --source idx --data-path /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).

The paper's recipe with every field a flag; see :mod:`experiments.image` for the run
folders, sweeps and resumption, and ``python -m experiments.fashion_mnist --help`` for the flags.
"""

from experiments import image

EXPERIMENT = "fashion_mnist"


def main(argv=None):
  return image.main(EXPERIMENT, argv)


if __name__ == "__main__":
  image.cli(EXPERIMENT)
