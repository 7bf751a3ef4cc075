"""The one training loop and what it needs; every training stage plugs in here.

- `config`: TrainConfig (the `train:` block of a stage's params), OptimConfig, ScheduleConfig
- `loop`: `fit(model, objective, data, cfg, ...)`, the `Objective` type and `LM` (next token)
- `data`: packed, BOS-aligned, resumable rows of a token split, sharded across processes
- `optim`: Muon + AdamW parameter groups, the warmup-stable-decay schedule
- `checkpoint`: atomic, checksummed safetensors + JSON checkpoints for resume
- `evaluate`: validation loss, bits per byte, the unigram floor
- `dist`: one process or torchrun DDP (gloo on CPU, NCCL on CUDA)
"""
