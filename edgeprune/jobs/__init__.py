"""The jobs: the stages in order (prune, build, lut, release, finetune, export --int8) over one prepared session."""
