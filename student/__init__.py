"""The student stage: fine-tune a small model on the filter's kept traces with TRL's SFTTrainer (LoRA or full).

`student.train.run` is the stage entry point; `student.launch` is what `accelerate launch` runs on every process
when `student.accelerate` names a launcher config; `student.merge` folds a LoRA adapter into its base.
"""
