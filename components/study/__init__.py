"""`medtune study`: a whole study (trainings, evaluations, tables, plots, manifest) from one YAML."""
