"""``python -m experiments.cifar10``: CIFAR10 (flip + random crop 32, pad 4).

The paper's recipe with every field a flag; see :mod:`experiments.image` for the run
folders, sweeps and resumption, and ``python -m experiments.cifar10 --help`` for the flags.
"""

if __name__ == "__main__":  # run as a program: one BLAS thread unless exported
  from experiments import threads  # (before JAX loads LAPACK; why: experiments.threads)
  threads.set_blas_defaults()

from experiments import image

EXPERIMENT = "cifar10"


def main(argv=None):
  return image.main(EXPERIMENT, argv)


if __name__ == "__main__":
  image.cli(EXPERIMENT, program=True)
