"""Command-line pieces the experiments share."""

from __future__ import annotations

# The paper's three heads and the forward-only ablation of the implicit one.
METHODS = ("standard", "fixed", "implicit", "implicit-fo")


def parse_methods(text: str) -> tuple[str, ...]:
  """A comma list of :data:`METHODS` (duplicates removed, order kept).

  Raises:
    ValueError: naming ``--methods``, for an empty list or an unknown method.
  """
  methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise ValueError(f"--methods: expected a comma list of {', '.join(METHODS)}; got {text!r}"
                     + (f" (unknown: {', '.join(bad)})" if bad else ""))
  return methods


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
