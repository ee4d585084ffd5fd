"""Stage 2, which reads stores: the streaming loader, augmentation, classifiers, attacks, the DRA head and loss,
the training loop and the Job it runs, evaluation and reports. Knows stage 1 only through `stores`."""
