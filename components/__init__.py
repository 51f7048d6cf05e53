"""medtune: torchtune components for medical question answering (data, models, optimizers, evaluation)."""
