"""Keys the Lab puts in a job's config that are not training parameters: accepted quietly (the
launch reads the ones it needs: model_path, adaptor_output_dir, job_id…)."""

from __future__ import annotations

BOOKKEEPING_KEYS = frozenset(
    {
        "model_path", "model_architecture", "model_filename", "model_file_path", "template_name",
        "template_id", "type", "job_id", "adaptor_output_dir", "experiment_name", "experiment_id",
        "run_sweeps", "sweep_config", "sweep_metric", "lower_is_better", "chatml_formatted_column",
        "formatting_template", "formatting_chat_template", "plugin_name", "dataset_id", "name",
        "description", "datasets", "_config", "_tlab_recipe_datasets", "_tlab_recipe_models",
    }
)
BOOKKEEPING_PREFIXES = ("embedding_", "sweep_", "_tfl", "_tlab")


def is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING_KEYS or key.startswith(BOOKKEEPING_PREFIXES)
