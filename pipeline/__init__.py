"""Training side of OneGen: collator, joint loss, forward pass, trainer and DeepSpeed driver."""
