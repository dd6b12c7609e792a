"""Recovery training for finetune: distillation, OrthoReg, C-SGD."""
