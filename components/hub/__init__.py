"""Publishing a run to the Hugging Face Hub: `medtune push` (files, checks, model card, upload)."""
