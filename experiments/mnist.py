"""``python -m experiments.mnist``: MNIST (the paper's released scripts: ResNet18, AGD, 200 epochs, seeds 1-3; the paper reports 5 seeds).

The paper's recipe with every field a flag; see :mod:`experiments.image` for the run
folders, sweeps and resumption, and ``python -m experiments.mnist --help`` for the flags.
"""

if __name__ == "__main__":  # run as a program: one BLAS thread unless exported
  from experiments import threads  # (before JAX loads LAPACK; why: experiments.threads)
  threads.set_blas_defaults()

from experiments import image

EXPERIMENT = "mnist"


def main(argv=None):
  return image.main(EXPERIMENT, argv)


if __name__ == "__main__":
  image.cli(EXPERIMENT, program=True)
