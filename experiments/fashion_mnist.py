"""``python -m experiments.fashion_mnist``: FashionMNIST (not in the paper; MNIST's recipe, FashionMNIST's normalisation). Offline: --source idx --data-path /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).

The paper's recipe with every field a flag; see :mod:`experiments.image` for the run
folders, sweeps and resumption, and ``python -m experiments.fashion_mnist --help`` for the flags.
"""

if __name__ == "__main__":  # run as a program: one BLAS thread unless exported
  from experiments import threads  # (before JAX loads LAPACK; why: experiments.threads)
  threads.set_blas_defaults()

from experiments import image

EXPERIMENT = "fashion_mnist"


def main(argv=None):
  return image.main(EXPERIMENT, argv)


if __name__ == "__main__":
  image.cli(EXPERIMENT, program=True)
