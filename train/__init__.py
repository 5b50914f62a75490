"""train: teachers and students for the distillation stage (imports curate, never the other way)."""
