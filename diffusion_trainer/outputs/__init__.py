"""What a run leaves behind, and the rules that keep what is not ours safe.

Owns: where outputs go and what their files are called (`layout`), the adapter folder and its
rescue (`adapter`), the single-file LoRA and `main.py export` (`export`; FLUX.2's BFL names in `bfl_keys`), the eval grid, the
before/after grid and loss curve (`figures`), metrics.json (`metrics`), and what a run may not
replace plus the output folder's lock (`guards`).
May import: the ground floor (`atomic`, `errors`, `lora`); `export` also reads a dataset's captions
(`data`) and the family registry (`families`) for folders written by earlier versions. Values come
in as plain arguments: nothing here reads the run's parameters object or its loop.
"""
