"""Training data, from where it lies to what each step feeds the model.

Owns: the sources a dataset comes from (`sources`), captions and the trigger word (`captions`),
decoding and transforming images (`images`), aspect-ratio buckets and the exact per-epoch batch
plan (`buckets`), the dataset of samples (`samples`), the one-pass check of every image (`check`),
the latent and text caches (`cache`), and turning a batch into the model's inputs (`batch`).
May import: the ground floor (`atomic`, `errors`, `hub_ids`, `seeds`). Settings come in as plain
values (an `images.Augmentation`, column names, sizes), never as the run's parameters object;
a Lab dataset name is resolved to a folder or hub id before it reaches here (lab/datasets.py).
"""
