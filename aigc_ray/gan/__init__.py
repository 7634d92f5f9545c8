"""The GAN itself, without Ray: networks (models), losses, differentiable augmentation with ADA (augment), and
the training step with its state (step). Ray Train runs `step.train_step` in every worker; a unit test runs
it on one CPU."""
