"""Stage 2: streaming loader, classifiers, attacks, DRA, training, evaluation."""
