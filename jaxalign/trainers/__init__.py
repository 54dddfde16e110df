"""Train state, the shared loop, checkpoints and logging; one module per algorithm family."""
