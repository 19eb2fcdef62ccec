"""``python -m experiments.cifar10``: CIFAR10 (flip + random crop 32, pad 4).

The paper's recipe with every field a flag; see :mod:`experiments.image` for the run
folders, sweeps and resumption, and ``python -m experiments.cifar10 --help`` for the flags.
"""

from experiments import image

EXPERIMENT = "cifar10"


def main(argv=None):
  return image.main(EXPERIMENT, argv)


if __name__ == "__main__":
  image.cli(EXPERIMENT)
