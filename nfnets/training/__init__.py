"""Training: experiment configs, the data-parallel steps and the loop.

`experiment_config` (defaults, `arg` parsing, validation), `optim` (AGC,
weight decay, SGD/AdamW/LAMB, the schedule), `steps` (the TrainState and the
per-device train and eval steps), `loop` (`train_and_evaluate`: resume,
train, evaluate, save), `checkpoint` (orbax), `weights_io` (the weights of
a run or a file, for init_from and export), `parallel` (mesh, batch
sharding, multi-host start) and `metrics` (metrics.jsonl and TensorBoard).
"""
