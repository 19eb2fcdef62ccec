"""Progress of a run: a tqdm bar over its steps, or plain lines."""

from __future__ import annotations

import sys


class Progress:
  """tqdm bar over a run's steps (rate, ETA, last epoch's loss and accuracy); plain lines
  when tqdm is missing or output is quiet."""

  def __init__(self, title: str, total: int, done: int, quiet: bool):
    self.title, self.quiet, self.bar = title, quiet, None
    if quiet:
      return
    try:
      from tqdm.auto import tqdm
    except ImportError:
      print(f"{title}: {done}/{total} steps", flush=True)
      return
    self.bar = tqdm(total=total, initial=done, desc=title, unit="step", dynamic_ncols=True,
                    mininterval=1.0, file=sys.stdout)

  def step(self):
    if self.bar is not None:
      self.bar.update(1)

  def epoch(self, record: dict, epochs: int):
    fields = {"epoch": f"{record['epoch']}/{epochs}", "loss": f"{record['train_loss']:.4f}",
              "top1": f"{record['train_top1']:.2f}"}
    if "test_top1" in record:
      fields["test"] = f"{record['test_top1']:.2f}"
    if "nc_train_nc1" in record:
      fields["NC1"] = f"{record['nc_train_nc1']:.2e}"
    if self.bar is not None:
      self.bar.set_postfix(fields, refresh=False)
    elif not self.quiet:
      print(f"{self.title} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
