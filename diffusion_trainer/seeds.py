"""How every random stream of a run derives from its one `seed`.

- `derived_seed(seed, *parts)`: an epoch's data order (seed, epoch), one sample's augmentation
  (seed, epoch, index): independent streams, the same on every machine and whatever the number
  of loader workers.
- `process_seed(seed, process_index)`: the noise and timesteps each process draws, its own
  (accelerate's device_specific seeding), so the images of one step do not share one draw.

Ground floor: imports nothing of the package.
"""

from __future__ import annotations

import numpy as np


def derived_seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def process_seed(seed: int, process_index: int) -> int:
    return seed + process_index
