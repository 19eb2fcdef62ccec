"""Command-line pieces the experiments share."""

from __future__ import annotations


def parse_seeds(text: str) -> tuple[int, ...]:
  """``"3"``, ``"1-5"`` or ``"1,4,7"`` (duplicates removed, order kept).

  Raises:
    ValueError: naming ``--seeds``, for anything else (``"5-1"``, ``"a"``, ``""``).
  """
  seeds: list[int] = []
  try:
    for part in text.split(","):
      part = part.strip()
      if "-" in part[1:]:
        lo, hi = part.split("-", 1)
        if int(hi) < int(lo):
          raise ValueError
        seeds.extend(range(int(lo), int(hi) + 1))
      else:
        seeds.append(int(part))
  except ValueError:
    raise ValueError(f"--seeds: expected N, A-B (A <= B) or a comma list of integers, "
                     f"got {text!r}") from None
  return tuple(dict.fromkeys(seeds))
