"""Transformer Lab: everything the trainer knows about the Lab, and the only part that talks to it.

Owns: the plugin and task launches (`launch`), the job as whichever `transformerlab` SDK is
installed shows it (`reporter`), the Lab's bookkeeping keys in a job's config (`keys`), the
datasets the Lab knows by name (`datasets`), and index.json, task.yaml and info.md, generated
from the schema (`manifest`).
May import: the ground floor, `outputs` and `run`. The SDK (`import lab`) is imported here
alone, and only inside functions, so the rest of the trainer runs without it.
"""
