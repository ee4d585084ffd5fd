"""Plans and dry runs: the inputs a stage will read, planned from the configuration where they are not there yet
(`inputs`, `features`), the training Job (`train`) and what a training step costs (`costs`)."""
