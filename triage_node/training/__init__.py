"""Training, synthesis and evaluation: what a worker never imports (torchvision keeps references/ apart)."""
