"""medtune's torchtune recipes: run them as `tune run recipes/<name>.py --config <yaml>`."""
