"""What a job starts from: models, calibration recipes and their samples, model outputs, target profiles."""
