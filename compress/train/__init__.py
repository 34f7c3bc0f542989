"""The training loop every stage shares (train, finetune, distillation, lottery levels) and its config."""
